"""The nightly job: ingest → scan → quality junk → dedupe → classify → semantic junk → write.

Why chunks of plain records: the input is streamed and processed
``chunk_size`` rows at a time, so a million-row manifest needs the memory of
two chunks (the one being decided and the next one's scans, ``scanned_ahead``)
plus the dedupe index, and with ``--store`` each chunk is a unit
of work that is committed once and never redone (see ``store``). Each stage
module knows nothing of the others; this file is the only place that knows
the order, and every stage's result is keyed by input row, so one row can
never go missing (``assemble`` walks the ingest records, not a stage's
output).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import json
import sys
import os
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.stages import decode as dec
from pipeline.stages.copies import EmbeddingIndex, Photo, classified_photos, find_copies
from pipeline.stages.dedupe import THUMB_SIDE, DedupeConfig, Hashes, Match, MatchIndex, find_duplicates
from pipeline.stages.scan import Scan, candidate, scan_records
from pipeline.ops.fsutil import atomic_path
from pipeline.models.classifier import Classifier
from pipeline.models.embeddings import neighbour_votes
from pipeline.models.preprocess import Preprocess
from pipeline.ops.device import has_gpu
from pipeline.stages.classify import predict, top_k
from pipeline.stages.ingest import Batch, Record, ingest
from pipeline.stages.junk import (Catalogue, HintReference, JunkConfig, catalogue_for, folded_note, folder_likeness,
                                  folder_verdict, hint_posterior, open_set_reason, photo_reason, quality_reason,
                                  sold_posterior, unfiled_hints)
from pipeline.stages.nearpairs import BatchIndex, SegmentSearch
from pipeline.stages.output import Summary, SummaryCounter, schema_with_meta, to_table, write_json
from pipeline.review.sheet import DEFAULT_REVIEW_THRESHOLD, apply_corrections, load_corrections
from pipeline.contract import LABEL_FIELDS
from pipeline.ops.store import History, Store, dequantise, fault_point, index_record

DEFAULT_CHUNK = 2048


@dataclass
class RunConfig:
    """Everything ``labelcat run`` can be told, with the documented defaults."""

    batch_size: int = 32
    engine: str = "auto"  # the model's engine (``classify.ENGINES``): XNNPACK on a CPU, TensorFlow on a GPU
    top_k: int = 3
    max_pixels: int = dec.DEFAULT_MAX_PIXELS
    max_bytes: int = dec.DEFAULT_MAX_BYTES
    workers: int = 0  # 0: one per core
    dedupe: DedupeConfig = field(default_factory=DedupeConfig)
    junk: JunkConfig = field(default_factory=JunkConfig)
    quiet: bool = False
    corrections: Path | None = None  # the review store; rows a person labelled get the person's label
    review_threshold: float | None = None  # recorded for `review export`; default: the model card's
    chunk_size: int = DEFAULT_CHUNK
    store: Path | str | Store | None = None  # history store (a folder, a URI or a ``Store``): incremental, resumable, locked
    relabel: bool = False  # with a store: classify again photos an older model version labelled
    skip_seen: bool = False  # with a store: leave already-labelled photos out of the output
    embeddings: bool = False  # write each classified photo's embedding to the output
    allow_outside: bool = False  # manifest paths may leave the manifest's folder
    catalogue: str = "auto"  # what labels may name: "auto" (the hints' categories), "all", or a comma-separated list
    log: Callable[[dict[str, Any]], None] = field(default=lambda event: None)


def new_run_id(started: datetime) -> str:
    """Sortable in time to the millisecond, unique by its random suffix."""
    return f"{started:%Y%m%dT%H%M%S}{started.microsecond // 1000:03d}Z-{uuid.uuid4().hex[:6]}"


def chunked(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    chunk: list[Record] = []
    for rec in records:
        chunk.append(rec)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def file_stat(rec: Record) -> tuple[str, int, int] | None:
    """(path, size, mtime_ns) of a record's file, or None when it cannot be stat'ed."""
    try:
        st = os.stat(rec.resolved)
    except (OSError, ValueError):
        return None
    return os.fsdecode(rec.resolved), st.st_size, st.st_mtime_ns


def file_stats(records: list[Record]) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of each file a chunk read, for the store to check on resume."""
    return [st for rec in records if (st := file_stat(rec)) is not None]


def input_fingerprint(source: Path) -> str:
    """What the input is, for resuming: manifest bytes, or the folder's names, sizes and times."""
    h = hashlib.sha256()
    if source.is_dir():
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames.sort()
            for name in sorted(filenames):
                p = Path(dirpath) / name
                with contextlib.suppress(OSError):
                    st = p.lstat()
                    h.update(f"{os.fsencode(p)!r}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    else:
        with open(source, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


@dataclass
class Engine:
    """Where one chunk's photos are scanned and classified: the only thing that differs between runners.

    Everything else (the order of the stages, dedupe against earlier chunks and
    nights, corrections, the store, the output) is ``run``'s, so the local and
    the Ray runner make the same decisions by construction.
    """

    scan: Callable[[list[Record], RunConfig, Preprocess], dict[int, Scan | tuple[str, str]]] | None
    classify: Callable[[list[Path], list, Classifier, RunConfig, Callable[[int], Any]], Any]
    # or the whole input read and scanned as one stream: (source, cfg, wanted) -> (n, records, scans) per
    # chunk, in order, ``scans`` None for chunks not wanted (the Ray runner's one Ray Data job)
    stream: Callable[[Path, RunConfig, Callable[[int], bool]],
                     Iterator[tuple[int, list[Record], dict[int, Scan | tuple[str, str]] | None]]] | None = None
    segment_search: Callable[[DedupeConfig], SegmentSearch] | None = None  # where ``BatchIndex`` searches (default: here)
    info: dict[str, Any] = field(default_factory=dict)  # recorded in the run's metadata
    device: str = ""
    scan_ahead: bool = False  # scan the next chunk on a thread while this one is classified (``scanned_ahead``)
    lock: Callable[[str], contextlib.AbstractContextManager] | None = None  # a store lock beyond flock (``Store.lock``)
    # where a chunk's parts are written: (store, n, rows, index records, files) -> a wait that returns when the
    # chunk is committed, with what to log; None: here, before the next chunk (``Store.commit_chunk``)
    commit: Callable[[Store, int, pa.Table, list[dict[str, Any]], list[tuple[str, int, int]]],
                     Callable[[], dict[str, Any]]] | None = None
    commits_ahead: int = 0  # chunks decided while earlier ones are still being written (``commit``)


def local_engine() -> Engine:
    """This process: a thread pool scans (one decode per photo), the tf.data loop classifies."""

    def scan(records: list[Record], cfg: RunConfig, preprocess: Preprocess) -> dict[int, Scan | tuple[str, str]]:
        return scan_records(records, cfg.max_pixels, cfg.max_bytes, cfg.workers, cfg.quiet, model_input=preprocess)

    def classify(paths: list[Path], ready: list, clf: Classifier, cfg: RunConfig, progress: Callable[[int], Any]):
        return predict(clf, paths, batch_size=cfg.batch_size, max_pixels=cfg.max_pixels, progress=progress, ready=ready,
                       engine=cfg.engine)

    return Engine(scan, classify, scan_ahead=True)


def scanned_ahead(chunks: Iterable[list[Record]], scan: Callable[[list[Record]], dict[int, Scan | tuple[str, str]]],
                  wanted: Callable[[int], bool], first: dict[int, Scan | tuple[str, str]] | None = None,
                  ahead: bool = True) -> Iterator[tuple[int, list[Record], dict[int, Scan | tuple[str, str]] | None]]:
    """(n, records, scans) per chunk, the next wanted chunk's scan running on a thread while the caller
    works on this one.

    Why: the scan (reading, decoding, hashing: Pillow and numpy, off the GIL) and the rest of a chunk
    (the model, on a GPU where there is one, and the decisions in Python) use different resources, so
    chunk n+1 is read while chunk n is classified instead of after it. At most two chunks' scans are
    held. A scan is pure (it writes nothing), so a killed run resumes exactly as before. ``scans`` is
    None for chunks not ``wanted`` (committed before a kill); ``first`` is chunk 0's scans when they were
    taken already (while the model loaded); ``ahead=False`` scans each chunk when its turn comes.
    """
    numbered = enumerate(chunks)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="labelcat-scan-ahead") as pool:

        def start(item: tuple[int, list[Record]] | None):
            if item is None:
                return None
            n, records = item
            if not wanted(n):
                return n, records, None
            if n == 0 and first is not None:
                return n, records, lambda: first
            if not ahead:
                return n, records, lambda: scan(records)
            return n, records, pool.submit(scan, records).result

        upcoming = start(next(numbered, None))
        try:
            while upcoming is not None:
                n, records, result = upcoming
                scans = result() if result is not None else None
                upcoming = start(next(numbered, None))  # the next chunk is scanned while this one is worked on
                yield n, records, scans
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class Context:
    """State that outlives one chunk: the dedupe index, kept photos' labels, history."""

    classifier: Classifier
    cfg: RunConfig
    run_id: str
    index: MatchIndex
    history: History
    corrections: dict[str, dict[str, Any]]
    kept_labels: dict[int, dict[str, Any]] = field(default_factory=dict)  # this run's kept rows
    engine: Engine = field(default_factory=local_engine)
    hint_reference: HintReference = field(default_factory=HintReference)  # labelled photos by hint, for outliers
    copies: EmbeddingIndex = field(default_factory=EmbeddingIndex)  # kept classified photos, for the copy check
    catalogue: Catalogue | None = None  # the categories the shop sells (``catalogue_for``); None: any
    unfiled: set[str] = field(default_factory=set)  # tonight's folder names that name no category (``unfiled_hints``)

    @property
    def departments(self) -> list[str | None] | None:
        """The catalogue's departments (``junk.files_under``), None without a catalogue or a taxonomy."""
        return self.catalogue.departments if self.catalogue is not None else None

    def hint(self, rec: Record) -> str | None:
        """The record's category hint as the run uses it: none where its folder name named no category of the
        photos filed under it (``unfiled_hints``), tonight, in this chunk or an earlier one."""
        return None if rec.category_hint in self.unfiled else rec.category_hint

    def remember(self, rec: dict[str, Any]) -> None:
        """Put an index record's embedding among the reference photos for folder outliers (labelled rows
        join their hint's; every classified row the shop's mean; this model's only: another model's
        embeddings live in another space)."""
        codes = rec.get("embedding_q8")
        if codes is not None and rec.get("model_version") == self.classifier.version:
            self.hint_reference.add(rec.get("category_hint") if rec["status"] == "labelled" else None,
                                    dequantise(codes, rec["embedding_scale"]))

    def keep_for_copies(self, key: int, rec: dict[str, Any]) -> None:
        """Make a kept, classified photo's index record a possible original for later photos' copy check
        (``copies``): its features (this model's only) under its two most likely categories (the top-k's
        first two, as ``copies.categories_of`` gives tonight's photos), and its thumbnail."""
        codes, thumb = rec.get("embedding_q8"), rec.get("thumb")
        if rec["in_dedupe"] and codes is not None and thumb and rec.get("model_version") == self.classifier.version:
            label, *also = (rec.get("topk_labels") or [rec.get("label")])[:2]
            self.copies.add(Photo(key, 0, label, codes, np.frombuffer(thumb, np.uint8).reshape(THUMB_SIDE, THUMB_SIDE, 3),
                                  tuple(also)))

    def recall(self, key: int, rec: dict[str, Any]) -> None:
        """Take in a photo the store remembers (an earlier night's, or this run's committed chunk) under
        ``key``: later photos may duplicate it, and it joins the folder-outlier reference. Its embedding
        codes and thumbnail bytes then leave the record: nothing reads them there again (the match and
        copy indexes hold what they need), and a million-photo history would hold 1.3 GB of codes."""
        if rec["in_dedupe"]:
            self.index.add(key, rec["sha256"], Hashes.from_fields(rec))
        self.keep_for_copies(key, rec)
        self.remember(rec)
        if self.catalogue is not None:  # what the shop filed photos under on earlier nights
            self.catalogue.add(self.classifier.hint_category(rec.get("category_hint")))
        rec.pop("embedding_q8", None)
        rec.pop("thumb", None)

    @property
    def review_threshold(self) -> float:
        """Confidence under which a labelled row needs a person: the option, the card's, else the default."""
        return float(_first_set(self.cfg.review_threshold, self.classifier.info.get("recommended_threshold"),
                                DEFAULT_REVIEW_THRESHOLD))


@dataclass
class Plan:
    """What one chunk's scans decide before the model: junk by quality, seen, duplicates, the rest."""

    good: dict[int, Scan]
    quality_junk: dict[int, str]
    seen: dict[int, int]
    duplicates: dict[int, Match]
    to_classify: list[int]


def file_identity(rec: Record) -> str:
    """An unusable file's identity across nights (it has no content hash): path, size and mtime."""
    st = file_stat(rec)
    return "\t".join(map(str, st)) if st is not None else f"{os.fsdecode(rec.resolved)}\t-\t-"


def plan_chunk(records: list[Record], scans: dict[int, Scan | tuple[str, str]], ctx: Context) -> Plan:
    """Quality junk, photos seen on earlier nights and duplicates; what is left gets classified."""
    cfg = ctx.cfg
    t = time.perf_counter()
    good = {row: s for row, s in scans.items() if isinstance(s, Scan)}
    quality_junk = {row: reason for row, s in good.items()
                    if (reason := quality_reason(s.quality, s.width, s.height, cfg.junk)) is not None}
    seen: dict[int, int] = {}
    for row, s in good.items():
        key = ctx.history.by_sha.get(s.sha256)
        if key is not None and key < 0:  # a row of an earlier night, whatever its status (same model under --relabel)
            seen[row] = key
    if ctx.history.by_file:
        for rec in records:
            if not isinstance(scans[rec.row], Scan):  # the same unusable file as on an earlier night: not a new error
                key = ctx.history.by_file.get(file_identity(rec))
                if key is not None and key < 0:
                    seen[rec.row] = key
    candidates = [candidate(row, s)
                  for row, s in good.items() if row not in quality_junk and row not in seen]
    duplicates = find_duplicates(candidates, cfg.dedupe, ctx.index)
    cfg.log({"stage": "dedupe", "rows": len(candidates), "duplicates": len(duplicates), "seen": len(seen),
             "seconds": round(time.perf_counter() - t, 3)})
    to_classify = sorted(row for row in good if row not in duplicates and row not in seen)
    return Plan(good, quality_junk, seen, duplicates, to_classify)


def with_hints(probs: np.ndarray, filed: np.ndarray, ctx: Context, sold: np.ndarray | None = None) -> np.ndarray:
    """The classified photos' category probabilities with their folders or hints counted (``--hint-trust``):
    what a kept row's label and top-k come from, so also what the copy check groups photos by (the index
    records of earlier chunks and nights carry that top-k). ``filed``: each photo's hint category index
    (``hint_indices``; -1 for none). ``sold``: the catalogue in force, which the prior is spread over."""
    return hint_posterior(probs, filed, ctx.cfg.junk.hint_trust, int(sold.sum()) if sold is not None else None)


def with_neighbours(given: np.ndarray, embeddings: np.ndarray, filed: np.ndarray, classifier: Classifier) -> np.ndarray:
    """``given`` with the rows that have no folder or hint (``filed`` -1) voted on by the chunk's most alike
    photos (``embeddings.neighbour_votes``): what their labels come from. The default model's zero-shot
    labels only, where it was measured (README, Decisions); a trained model's classes are the shop's own."""
    if classifier.taxonomy is None or not (filed < 0).any():
        return given
    return np.where((filed < 0)[:, None], neighbour_votes(given, embeddings), given)


def hint_indices(hints: list[str | None], classifier: Classifier) -> np.ndarray:
    """Each hint's category index among the classifier's categories, -1 where it names none."""
    cats = classifier.categories
    named = [classifier.hint_category(h) for h in hints]
    return np.array([cats.index(c) if c in cats else -1 for c in named], int)


def confirm_copies(plan: Plan, preds: Any, hinted: np.ndarray, ctx: Context) -> None:
    """The copy check after the model (``copies``): classified photos that copy a kept photo become its
    duplicates, leave the match index, and rows that duplicated them point at what they copy. ``hinted``:
    ``with_hints`` of the predictions, which the rows' labels come from too."""
    t = time.perf_counter()
    use = [i for i, row in enumerate(plan.to_classify)
           if preds.embeddings.shape[1] and not preds.errors[i] and row not in plan.quality_junk
           and plan.good[row].hashes.thumb is not None]
    good = [plan.good[plan.to_classify[i]] for i in use]
    photos = classified_photos([plan.to_classify[i] for i in use], [s.width * s.height for s in good],
                               [s.hashes.thumb for s in good], hinted[use], preds.embeddings[use],
                               ctx.classifier.categories, [s.fidelity for s in good])
    copies = find_copies(photos, ctx.copies, ctx.cfg.dedupe)
    for row in copies:
        ctx.index.discard(row, plan.good[row].sha256)
    for row, match in plan.duplicates.items():  # a copy of a copy: straight at the kept photo (no chains)
        if match.kept in copies:
            plan.duplicates[row] = Match(row, copies[match.kept].kept, "near", match.phash_distance)
    plan.duplicates.update(copies)
    ctx.cfg.log({"stage": "copies", "rows": len(photos), "duplicates": len(copies),
                 "seconds": round(time.perf_counter() - t, 3)})


def finish_chunk(records: list[Record], scans: dict[int, Scan | tuple[str, str]], plan: Plan, preds: Any,
                 hinted: np.ndarray, ctx: Context, processed_at: datetime, given: np.ndarray | None = None,
                 sold: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Rows from the plan and the model's predictions: assemble, human corrections, inherited labels."""
    rows = assemble(records, scans, plan.quality_junk, plan.duplicates, plan.seen, plan.to_classify, preds, hinted,
                    ctx, processed_at, given, sold)
    for r in rows:  # errors, duplicates and seen rows: nothing for a person to decide on this row
        r.setdefault("needs_review", False)
    if ctx.corrections:
        apply_corrections(rows, ctx.corrections, ctx.classifier.hint_category,
                          lambda msg: ctx.cfg.log({"stage": "corrections", "message": msg}))
    inherit_duplicates(rows, ctx)
    return rows


def scan_chunk(records: list[Record], cfg: RunConfig, engine: Engine, preprocess: Preprocess,
               note: dict[str, Any] | None = None) -> dict[int, Scan | tuple[str, str]]:
    """The engine's scan of one chunk, timed in the log (``note`` adds to its event)."""
    t = time.perf_counter()
    scans = engine.scan(records, cfg, preprocess)
    cfg.log({"stage": "scan", "rows": len(records), "seconds": round(time.perf_counter() - t, 3), **(note or {})})
    return scans


def process_chunk(records: list[Record], ctx: Context, processed_at: datetime,
                  scans: dict[int, Scan | tuple[str, str]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One scanned chunk through every other stage: (output rows, index records of its kept photos)."""
    cfg, clf = ctx.cfg, ctx.classifier
    plan = plan_chunk(records, scans, ctx)

    t = time.perf_counter()
    by_row = {r.row: r for r in records}
    with tqdm(total=len(plan.to_classify), desc="classify", unit="img", disable=cfg.quiet or None, leave=False) as bar:
        preds = ctx.engine.classify([by_row[row].resolved for row in plan.to_classify],
                                    [plan.good[row].pixels for row in plan.to_classify], clf, cfg, bar.update)
    for scan in plan.good.values():  # the model inputs have served; the chunk's memory goes back
        scan.pixels = None
    hints = [by_row[row].category_hint for row in plan.to_classify]
    unfiled = unfiled_hints(preds.probs, hints, [clf.hint_category(h) for h in hints], list(clf.categories),
                            preds.product_mass, preds.group_mass, clf.groups, cfg.junk)
    for name, (contradicted, photos) in sorted(unfiled.items()):
        category = clf.hint_category(name)
        cfg.log({"stage": "hints", "ignored": name, "category": category,
                 "message": f"{contradicted} of the {photos} photos filed under {name!r} confidently show another "
                            f"category than {category}: the folder is no category hint"})
    ctx.unfiled |= set(unfiled)
    sold = None
    if ctx.catalogue is not None:
        for rec in records:
            ctx.catalogue.add(clf.hint_category(ctx.hint(rec)))
        sold = ctx.catalogue.sold()
    cfg.log({"stage": "classify", "rows": len(plan.to_classify), "seconds": round(time.perf_counter() - t, 3),
             **({"engine": clf.info["engine"]} if "engine" in clf.info else {}),  # the Ray runner's is its actors'
             **({"catalogue": [c for c, s in zip(clf.categories, sold) if s]} if sold is not None else {})})
    # the photo shows something the shop sells: the labels, the junk rules and the copy check's categories
    # read the probabilities given that; the model's own say which photos show something it does not sell
    hints = [ctx.hint(by_row[row]) for row in plan.to_classify]
    filed = hint_indices(hints, clf)
    given = sold_posterior(preds.probs, sold, ctx.departments, filed)
    hinted = with_hints(with_neighbours(given, preds.embeddings, filed, clf), filed, ctx, sold)
    confirm_copies(plan, preds, hinted, ctx)

    rows = finish_chunk(records, scans, plan, preds, hinted, ctx, processed_at, given, sold)
    index_records = []
    for r in rows:  # every row of tonight is remembered, so later nights call it seen whatever its status
        s = plan.good.get(r["row"])
        kept = r["status"] in ("labelled", "junk") and r.get("duplicate_of") is None
        if kept:
            ctx.kept_labels[r["row"]] = {k: r.get(k) for k in LABEL_FIELDS}
        if r["status"] == "seen":
            continue
        if s is not None:
            rec = index_record(ctx.run_id, r, s.hashes.to_fields(), kept and r["row"] not in plan.quality_junk,
                               clf.version)
        elif r["status"] == "error":
            rec = index_record(ctx.run_id, r, {}, False, clf.version, file_identity(by_row[r["row"]]))
        else:
            continue
        rec["category_hint"] = ctx.hint(by_row[r["row"]])  # what later nights may count as a hint
        index_records.append(rec)
    for rec in index_records:  # later chunks judge their folder outliers, and their copies, against these too
        ctx.remember(rec)
        ctx.keep_for_copies(rec["row"], rec)
    for r in rows:
        if r.get("embedding") is not None:
            r["embedding"] = r["embedding"].astype("float16") if cfg.embeddings else None
    return rows, index_records


class Commits:
    """The chunks being committed to the store: each is written where the engine says (``Engine.commit``),
    and its ``commit`` event is logged, and its ``after-chunk`` fault point reached, once it is committed.

    Why a queue: the Ray runner's workers write a chunk's parts while the driver decides the next chunks
    (``Engine.commits_ahead``); the local runner writes each chunk before it goes on.
    """

    def __init__(self, store: Store, engine: Engine, cfg: RunConfig) -> None:
        self.store, self.engine, self.cfg = store, engine, cfg
        self.pending: collections.deque[tuple[int, int, float, Callable[[], dict[str, Any]]]] = collections.deque()

    def submit(self, n: int, table: pa.Table, index_records: list[dict[str, Any]],
               files: list[tuple[str, int, int]]) -> None:
        t = time.perf_counter()
        if self.engine.commit is None:
            self.store.commit_chunk(n, table, index_records, files)
            wait: Callable[[], dict[str, Any]] = dict
        else:
            wait = self.engine.commit(self.store, n, table, index_records, files)
        self.pending.append((n, table.num_rows, time.perf_counter() - t, wait))
        self.settle(self.engine.commits_ahead)

    def settle(self, ahead: int) -> None:
        """Wait until at most ``ahead`` chunks are still being written."""
        while len(self.pending) > ahead:
            n, rows, spent, wait = self.pending.popleft()
            t = time.perf_counter()
            more = wait()
            # seconds: the driver's own, submitting the chunk and waiting for it
            self.cfg.log({"stage": "commit", "chunk": n, "rows": rows,
                          "seconds": round(spent + time.perf_counter() - t, 3), **more})
            fault_point(f"after-chunk:{n}")


def run(source: str | Path, out: str | Path | None, classifier: Classifier | Future, cfg: RunConfig,
        engine: Engine | None = None, preprocess: Preprocess | None = None) -> Summary:
    """Run the whole pipeline on ``source``; write ``out`` and/or the store; return the summary.

    ``classifier`` may still be loading (a ``Future``, as the CLI passes it):
    then the first chunk is scanned with ``preprocess`` (the model input the
    loading model is expected to take) while TensorFlow imports and the weights
    load, and the scan is kept if the model takes that input.

    Raises ``IngestError`` for unusable input (before anything is written) and
    ``StoreLocked`` when another run holds the store; any other exception
    means the run failed and ``out`` was left untouched (the store keeps the
    chunks committed so far for the next run to resume).
    """
    t0 = time.perf_counter()
    started = datetime.now(timezone.utc)
    source = Path(source)
    batch = ingest(source, allow_outside=cfg.allow_outside)
    store = cfg.store if isinstance(cfg.store, Store) or cfg.store is None else Store(cfg.store)
    engine = engine or local_engine()
    with store.lock(engine.lock) if store else contextlib.nullcontext():
        chunks: Iterator[list[Record]] = chunked(batch.records, cfg.chunk_size)
        early: dict[int, Scan | tuple[str, str]] | None = None
        if isinstance(classifier, Future):
            first = next(chunks, None) if engine.stream is None else None
            if first is not None:
                chunks = itertools.chain([first], chunks)
                if preprocess is not None:
                    early = scan_chunk(first, cfg, engine, preprocess, {"while": "the model loads"})
            classifier = classifier.result()
            if preprocess != classifier.preprocess:  # the model takes another input: scan again
                early = None
        catalogue = catalogue_for(classifier, cfg.catalogue)  # a usage error before anything is written
        run_id = new_run_id(started)
        run_date = f"{started:%Y-%m-%d}"
        done: set[int] | None = set()
        if store:
            run_id, run_date, done = store.open_staging(
                input_fingerprint(source), classifier.version, cfg.chunk_size, run_id, run_date,
                lambda msg: cfg.log({"stage": "store", "message": msg}))
        published = None if done is not None else store.published_parts(run_date, run_id)
        history = store.load_history(classifier.version if cfg.relabel else None) if store else History()
        corrections = load_corrections(cfg.corrections) if cfg.corrections else {}
        search = engine.segment_search(cfg.dedupe) if engine.segment_search else None
        ctx = Context(classifier, cfg, run_id, BatchIndex(cfg.dedupe, search), history, corrections, engine=engine,
                      hint_reference=HintReference(cfg.junk.outlier_reference),
                      catalogue=catalogue)
        for key, rec in history.entries.items():  # in publishing order: the most recent stay in the reference
            ctx.recall(key, rec)
        meta = run_meta(source, batch, classifier, cfg, run_id, started)
        if engine.info:
            meta["runner"] = engine.info
        counter = SummaryCounter()
        committing = Commits(store, engine, cfg) if store else None
        with contextlib.ExitStack() as stack:
            writer = None
            if out is not None:
                tmp = stack.enter_context(atomic_path(out, suffix=".parquet"))
                writer = stack.enter_context(pq.ParquetWriter(tmp, schema_with_meta(batch.extra_columns, meta),
                                                              compression="zstd"))
            wanted = (lambda n: False) if published is not None else (lambda n, done=frozenset(done): n not in done)
            if engine.stream is not None:
                scanning = engine.stream(source, cfg, wanted)
            else:
                scanning = scanned_ahead(chunks, lambda recs: scan_chunk(recs, cfg, engine, classifier.preprocess),
                                         wanted, early, engine.scan_ahead)
            for n, records, scans in scanning:
                if published is not None:  # the work was done before a kill mid-publish
                    table = store.read_published(published[n])
                elif n in done:
                    table, index_records = store.read_chunk(n)
                    for rec in index_records:  # this run's committed photos, under their row keys
                        ctx.recall(history.add(rec, key=rec["row"]), rec)
                        if rec["status"] in ("labelled", "junk"):
                            ctx.kept_labels[rec["row"]] = {k: rec.get(k) for k in LABEL_FIELDS}
                    cfg.log({"stage": "resume", "chunk": n, "rows": table.num_rows})
                else:
                    rows, index_records = process_chunk(records, ctx, datetime.now(timezone.utc), scans)
                    table = to_table(rows, batch.extra_columns, meta)
                    if store:
                        committing.submit(n, table, index_records, file_stats(records))
                counter.update_table(table)
                if writer is not None:
                    if cfg.skip_seen:
                        table = table.filter(pc.not_equal(table["status"], "seen"))
                    writer.write_table(table)
            if committing:
                committing.settle(0)
        # --out is in place before the store publishes: a kill between the two leaves the staging
        # complete, and the re-run rewrites --out from it (never from a published night, where
        # tonight's photos would already count as seen).
        if store and published is None:
            fault_point("before-publish")
            cfg.log({"stage": "publish", "path": str(store.publish())})
    summary = counter.summary(
        run_id=run_id, out=str(out) if out is not None else store.location, seconds=time.perf_counter() - t0,
        model=classifier.name, model_version=classifier.version,
        device=engine.device or ("GPU" if has_gpu() else "CPU"),
    )
    cfg.log({"stage": "done", **summary.as_dict()})
    return summary


def run_meta(source: Path, batch: Batch, classifier: Classifier, cfg: RunConfig, run_id: str, started: datetime) -> dict[str, Any]:
    return {
        "run_id": run_id, "input": str(source), "started": started.isoformat(), "model": classifier.name,
        "model_version": classifier.version, "config": _config_dict(cfg), "labels": list(classifier.categories),
        "extra_columns": batch.extra_columns,
        "review_threshold": _first_set(cfg.review_threshold, classifier.info.get("recommended_threshold"),
                                       DEFAULT_REVIEW_THRESHOLD),
        # manifest paths are relative to the manifest; folder paths are as walked from the working directory
        "path_base": str((source.parent if batch.source == "manifest" else Path.cwd()).resolve()),
    }


def _config_dict(cfg: RunConfig) -> dict[str, Any]:
    d = {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.__dict__.items() if k != "log"}
    d["dedupe"] = dict(cfg.dedupe.__dict__)
    d["junk"] = dict(cfg.junk.__dict__)
    return d


def assemble(
    records: list[Record],
    scans: dict[int, Scan | tuple[str, str]],
    quality_junk: dict[int, str],
    duplicates: dict[int, Match],
    seen: dict[int, int],
    classified: list[int],
    preds: Any,
    hinted: np.ndarray,
    ctx: Context,
    processed_at: datetime,
    given: np.ndarray | None = None,
    sold: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """One output dict per ingest record of the chunk, in input order. ``hinted``: the predictions'
    probabilities with the folders counted (``with_hints``), where the labels of kept rows come from;
    ``given``: the probabilities given the catalogue ``sold`` (``sold_posterior``; the predictions' own when
    there is none), what the photo alone looks like."""
    classifier, cfg = ctx.classifier, ctx.cfg
    cats = classifier.categories
    pos = {row: i for i, row in enumerate(classified)}
    groups = classifier.groups

    by_row_rec = {r.row: r for r in records}
    hints = [ctx.hint(by_row_rec[row]) for row in classified]
    # The photo alone decides junk; the photo and its folder together decide the label of what is kept.
    given = preds.probs if given is None else given
    alone_labels, alone_scores = top_k(given, cats, cfg.top_k)
    labels, scores = top_k(hinted, cats, cfg.top_k)
    likeness = folder_likeness(preds.embeddings, hints, cfg.junk, ctx.hint_reference.for_hints(hints))
    open_set = classifier.info.get("open_set")
    rows: list[dict[str, Any]] = []
    for rec in records:
        hint_cat = classifier.hint_category(ctx.hint(rec))
        row: dict[str, Any] = {
            "row": rec.row, "sku": rec.sku, "path": rec.path, "category_hint": rec.category_hint,
            "hint_category": hint_cat, "model": classifier.name, "model_version": classifier.version,
            "run_id": ctx.run_id, "processed_at": processed_at, **rec.extra,
        }
        scan = scans[rec.row]
        if not isinstance(scan, Scan):
            row.update(status="error", error=scan[0], error_detail=scan[1])
            if rec.row in seen:  # the same broken file as on an earlier night: reported, not a new error
                earlier = ctx.history.entries[seen[rec.row]]
                row.update(status="seen", seen_in=f"{earlier['run_id']}#{earlier['row']}")
            rows.append(row)
            continue
        row.update(sha256=scan.sha256, phash=scan.hashes.phash_hex, phash256=scan.hashes.fine_hex,
                   width=scan.width, height=scan.height, pixel_std=scan.quality.pixel_std,
                   aspect_ratio=scan.quality.aspect_ratio)
        if rec.row in seen:
            earlier = ctx.history.entries[seen[rec.row]]
            row.update(status="seen", seen_in=f"{earlier['run_id']}#{earlier['row']}",
                       **{k: earlier.get(k) for k in LABEL_FIELDS})
            rows.append(row)
            continue
        if rec.row in duplicates:
            match = duplicates[rec.row]
            row.update(status="duplicate", duplicate_kind=match.kind)
            if match.kept >= 0:
                row["duplicate_of"] = match.kept
            else:  # kept on an earlier night
                earlier = ctx.history.entries[match.kept]
                row.update(duplicate_of=earlier["row"], duplicate_of_run=earlier["run_id"])
            rows.append(row)
            continue
        i = pos[rec.row]
        if preds.errors[i]:  # changed or vanished since the scan
            row.update(status="error", error=preds.errors[i][0], error_detail=preds.errors[i][1])
            rows.append(row)
            continue
        label, confidence = alone_labels[i][0], alone_scores[i][0]  # what the photo alone looks like
        row.update(product_evidence=float(preds.product_mass[i]), imagenet_top=preds.imagenet_top[i],
                   embedding=preds.embeddings[i] if preds.embeddings.shape[1] else None)
        reason, review_note = quality_junk.get(rec.row), None
        if not reason:
            reason, review_note = folder_verdict(
                photo_reason(given[i], preds.probs[i], sold, cats, float(preds.product_mass[i]), preds.group_mass[i],
                             groups, hint_cat, cfg.junk, ctx.departments)
                or open_set_reason(preds.embeddings[i], open_set, cats, label, hint_cat, cfg.junk),
                likeness.get(i), label, hint_cat, cfg.junk)
        if reason:  # junk keeps what the photo looks like, for the reviewer to overrule
            row.update(label=label, confidence=confidence, topk_labels=alone_labels[i], topk_scores=alone_scores[i],
                       label_source="model")
        else:
            row.update(label=labels[i][0], confidence=scores[i][0], topk_labels=labels[i], topk_scores=scores[i],
                       label_source="model" if labels[i][0] == label else "hint" if hint_cat else "neighbours")
            if row["label_source"] == "hint" and not review_note:
                review_note = f"hint_decided: filed as {hint_cat}; the photo alone says {label} ({confidence:.2f})"
            if row["label_source"] == "neighbours" and not review_note:
                review_note = (f"neighbours_decided: the photo alone says {label} ({confidence:.2f}); "
                               f"its most alike photos tonight say {labels[i][0]}")
            review_note = review_note or folded_note(preds.probs[i], row["label"], sold, cats, ctx.departments,
                                                     hint_cat)
        row.update(status="junk" if reason else "labelled", junk_reason=reason)
        row.update(review_flag(row, review_note, ctx.review_threshold))
        rows.append(row)
    return rows


def review_flag(row: dict[str, Any], note: str | None, threshold: float) -> dict[str, Any]:
    """``needs_review`` and ``review_reason`` of a classified row: the same decision the review sheet uses."""
    if row["status"] == "junk":
        return {"needs_review": True, "review_reason": "junk: " + str(row["junk_reason"]).split(":", 1)[0]}
    if row.get("hint_category") and row["label"] != row["hint_category"]:
        return {"needs_review": True,
                "review_reason": f"hint_mismatch: filed as {row['hint_category']}, model says {row['label']}"}
    if note:
        return {"needs_review": True, "review_reason": note}
    if row["confidence"] is not None and row["confidence"] < threshold:
        return {"needs_review": True, "review_reason": f"low_confidence: {row['confidence']:.2f} < {threshold}"}
    return {"needs_review": False, "review_reason": None}


def inherit_duplicates(rows: list[dict[str, Any]], ctx: Context) -> None:
    """Duplicates take the kept photo's label (after corrections, so a human label carries over)."""
    by_row = {r["row"]: r for r in rows}
    for r in rows:
        if r["status"] != "duplicate" or r.get("duplicate_of") is None:
            continue
        if r.get("duplicate_of_run"):
            kept = ctx.history.entries[ctx.history.by_ref[(r["duplicate_of_run"], r["duplicate_of"])]]
        else:
            kept = by_row.get(r["duplicate_of"]) or ctx.kept_labels.get(r["duplicate_of"], {})
        for k in LABEL_FIELDS:
            r[k] = kept.get(k)


def _first_set(*values: float | None) -> float | None:
    """The first value that is not None (0.0 is a real threshold, unlike ``x or default``)."""
    return next((v for v in values if v is not None), None)


def write_summary_json(summary: Summary, path: str | Path) -> None:
    write_json(summary.as_dict(), path)


def log_to_file(path: str | Path) -> Callable[[dict[str, Any]], None]:
    """One JSON line per event, appended and flushed (a killed run keeps what it logged).

    The parent folder is created; opening fails early (a usage error). A write
    that fails later (disk full) costs one line on stderr, never the run.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the run
    broken = False
    lock = threading.Lock()  # the scan-ahead thread logs too: one whole line at a time

    def log(event: dict[str, Any]) -> None:
        nonlocal broken
        if broken:
            return
        try:
            line = json.dumps({"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), **event},
                              default=str) + "\n"
            with lock:
                fh.write(line)
                fh.flush()
        except OSError as exc:
            broken = True
            print(f"labelcat: --log-file {path}: {exc.strerror or exc}; logging stopped", file=sys.stderr)

    return log

