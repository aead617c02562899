"""The nightly job: ingest → scan → quality junk → dedupe → classify → semantic junk → write.

Why a plain function over plain records: each stage module knows nothing of
the others; this file is the only place that knows the order, and every
stage's result is a dict keyed by input row, so one row can never go missing
(``assemble`` walks the ingest records, not any stage's output).
"""

from __future__ import annotations

import hashlib
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm import tqdm

from . import decode as dec
from .dedupe import Candidate, DedupeConfig, Hashes, Match, compute_hashes, find_duplicates
from .infer import Classifier, cpu_count, has_gpu, predict, top_k
from .ingest import Batch, Record, ingest
from .junk import JunkConfig, Quality, quality_reason, quality_stats, semantic_reason
from .output import Summary, summarise, to_table, write_json, write_parquet
from .review import DEFAULT_REVIEW_THRESHOLD, apply_corrections, load_corrections

SCAN_SIDE = 256  # decode size for hashing and quality checks (JPEG draft mode)


@dataclass
class RunConfig:
    """Everything ``labelcat run`` can be told, with the documented defaults."""

    batch_size: int = 32
    top_k: int = 3
    max_pixels: int = dec.DEFAULT_MAX_PIXELS
    max_bytes: int = dec.DEFAULT_MAX_BYTES
    workers: int = 0  # 0: one per core
    dedupe: DedupeConfig = field(default_factory=DedupeConfig)
    junk: JunkConfig = field(default_factory=JunkConfig)
    quiet: bool = False
    corrections: Path | None = None  # the review store; rows a person labelled get the person's label
    review_threshold: float | None = None  # recorded for `review export`; default: the model card's


@dataclass
class Scan:
    """What one read of the file told us (before the model)."""

    sha256: str
    width: int
    height: int
    hashes: Hashes
    quality: Quality


def scan_file(path: Path, max_pixels: int, max_bytes: int) -> Scan:
    """Read, hash and measure one photo; raises ``DecodeError`` with a reason."""
    data = dec.read_bytes(path, max_bytes)
    digest = hashlib.sha256(data).hexdigest()
    img = dec.open_image(data, max_pixels)
    width, height = dec.upright_size(img)
    rgb = dec.decode_opened(img, min_side=SCAN_SIDE)
    return Scan(digest, width, height, compute_hashes(rgb), quality_stats(rgb))


def _scan_all(records: list[Record], cfg: RunConfig) -> dict[int, Scan | tuple[str, str]]:
    todo = [r for r in records if r.error is None]
    out: dict[int, Scan | tuple[str, str]] = {r.row: r.error for r in records if r.error is not None}

    def one(rec: Record) -> tuple[int, Scan | tuple[str, str]]:
        try:
            return rec.row, scan_file(rec.resolved, cfg.max_pixels, cfg.max_bytes)
        except dec.DecodeError as exc:
            return rec.row, (exc.code, exc.detail)
        except Exception as exc:  # noqa: BLE001 - a decoder bug on one photo must not stop the night
            return rec.row, ("decode_failed", f"{type(exc).__name__}: {exc}")

    with ThreadPoolExecutor(max_workers=cfg.workers or cpu_count()) as pool:
        for row, result in tqdm(pool.map(one, todo), total=len(todo), desc="scan", unit="img", disable=cfg.quiet or None):
            out[row] = result
    return out


def run(source: str | Path, out: str | Path, classifier: Classifier, cfg: RunConfig) -> Summary:
    """Run the whole pipeline on ``source`` and write ``out``; returns the summary.

    Raises ``IngestError`` for unusable input (before anything is written);
    any other exception means the run failed and ``out`` was left untouched.
    """
    t0 = time.perf_counter()
    started = datetime.now(timezone.utc)
    run_id = f"{started:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    stage: dict[str, float] = {}

    batch = ingest(source)
    stage["ingest"] = time.perf_counter() - t0

    t = time.perf_counter()
    scans = _scan_all(batch.records, cfg)
    stage["scan"] = time.perf_counter() - t

    t = time.perf_counter()
    good = {row: s for row, s in scans.items() if isinstance(s, Scan)}
    quality_junk = {
        row: reason
        for row, s in good.items()
        if (reason := quality_reason(s.quality, s.width, s.height, cfg.junk)) is not None
    }
    candidates = [Candidate(row, s.sha256, s.width * s.height, s.hashes) for row, s in good.items() if row not in quality_junk]
    duplicates = find_duplicates(candidates, cfg.dedupe)
    stage["dedupe"] = time.perf_counter() - t

    t = time.perf_counter()
    to_classify = sorted(row for row in good if row not in duplicates)
    by_row = {r.row: r for r in batch.records}
    with tqdm(total=len(to_classify), desc="classify", unit="img", disable=cfg.quiet or None) as bar:
        preds = predict(
            classifier,
            [by_row[row].resolved for row in to_classify],
            batch_size=cfg.batch_size,
            max_pixels=cfg.max_pixels,
            progress=bar.update,
        )
    stage["classify"] = time.perf_counter() - t

    rows = assemble(batch, scans, quality_junk, duplicates, to_classify, preds, classifier, cfg, run_id, started)
    human = 0
    if cfg.corrections is not None:
        human = apply_corrections(rows, load_corrections(cfg.corrections))
    inherit_duplicates(rows)
    t = time.perf_counter()
    source_path = Path(source)
    run_meta = {
        "run_id": run_id, "input": str(source), "started": started.isoformat(), "model": classifier.name,
        "model_version": classifier.version, "config": _config_dict(cfg), "labels": list(classifier.categories),
        "extra_columns": batch.extra_columns, "human_labels": human,
        "review_threshold": cfg.review_threshold or classifier.info.get("recommended_threshold") or DEFAULT_REVIEW_THRESHOLD,
        # manifest paths are relative to the manifest; folder paths are as walked from the working directory
        "path_base": str((source_path.parent if batch.source == "manifest" else Path.cwd()).resolve()),
    }
    write_parquet(to_table(rows, batch.extra_columns, run_meta), out)
    stage["write"] = time.perf_counter() - t
    return summarise(
        rows,
        run_id=run_id,
        out=str(out),
        seconds=time.perf_counter() - t0,
        stage_seconds={k: round(v, 3) for k, v in stage.items()},
        classified=len(to_classify),
        model=classifier.name,
        model_version=classifier.version,
        device="GPU" if has_gpu() else "CPU",
    )


def _config_dict(cfg: RunConfig) -> dict[str, Any]:
    d = {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.__dict__.items()}
    d["dedupe"] = dict(cfg.dedupe.__dict__)
    d["junk"] = dict(cfg.junk.__dict__)
    return d


def assemble(
    batch: Batch,
    scans: dict[int, Scan | tuple[str, str]],
    quality_junk: dict[int, str],
    duplicates: dict[int, Match],
    classified: list[int],
    preds: Any,
    classifier: Classifier,
    cfg: RunConfig,
    run_id: str,
    processed_at: datetime,
) -> list[dict[str, Any]]:
    """One output dict per ingest record, in input order."""
    tax = classifier.taxonomy
    cats = classifier.categories
    pos = {row: i for i, row in enumerate(classified)}
    labels, scores = top_k(preds.probs, cats, cfg.top_k)
    groups = tax.groups if tax else []

    rows: list[dict[str, Any]] = []
    for rec in batch.records:
        hint_cat = tax.resolve_hint(rec.category_hint) if tax else _match_class(rec.category_hint, cats)
        row: dict[str, Any] = {
            "row": rec.row, "sku": rec.sku, "path": rec.path, "category_hint": rec.category_hint,
            "hint_category": hint_cat, "model": classifier.name, "model_version": classifier.version,
            "run_id": run_id, "processed_at": processed_at, **rec.extra,
        }
        scan = scans[rec.row]
        if not isinstance(scan, Scan):
            row.update(status="error", error=scan[0], error_detail=scan[1])
            rows.append(row)
            continue
        row.update(sha256=scan.sha256, phash=scan.hashes.phash_hex, phash256=scan.hashes.fine_hex,
                   width=scan.width, height=scan.height, pixel_std=scan.quality.pixel_std,
                   aspect_ratio=scan.quality.aspect_ratio)
        if rec.row in duplicates:
            match = duplicates[rec.row]
            row.update(status="duplicate", duplicate_of=match.kept, duplicate_kind=match.kind)
            rows.append(row)
            continue
        i = pos[rec.row]
        if preds.errors[i]:  # changed or vanished since the scan
            row.update(status="error", error=preds.errors[i][0], error_detail=preds.errors[i][1])
            rows.append(row)
            continue
        label, confidence = labels[i][0], scores[i][0]
        row.update(label=label, confidence=confidence, topk_labels=labels[i], topk_scores=scores[i],
                   label_source="model", product_evidence=float(preds.product_mass[i]),
                   imagenet_top=preds.imagenet_top[i])
        reason = quality_junk.get(rec.row) or semantic_reason(
            label, confidence, preds.probs[i], cats, float(preds.product_mass[i]),
            preds.group_mass[i], groups, hint_cat, cfg.junk,
        )
        row.update(status="junk" if reason else "labelled", junk_reason=reason)
        rows.append(row)

    return rows


def inherit_duplicates(rows: list[dict[str, Any]]) -> None:
    """Duplicates take the kept row's label (after corrections, so a human label carries over)."""
    by_row = {r["row"]: r for r in rows}
    for r in rows:
        if r["status"] == "duplicate" and r.get("duplicate_of") is not None:
            kept = by_row[r["duplicate_of"]]
            for k in ("label", "confidence", "topk_labels", "topk_scores", "label_source", "product_evidence", "imagenet_top"):
                r[k] = kept.get(k)


def _match_class(hint: str | None, classes: list[str]) -> str | None:
    """The class a hint names for a trained model (case/separator-insensitive)."""
    from .taxonomy import normalise_hint

    if not hint:
        return None
    key = normalise_hint(hint)
    return next((c for c in classes if normalise_hint(c) == key), None)


def write_summary_json(summary: Summary, path: str | Path) -> None:
    write_json(summary.as_dict(), path)
