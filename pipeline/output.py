"""Write: one Parquet row per input row, a documented schema, atomically.

Why the schema lives in code and in the file: the shop's inventory system
reads this file unattended, so column names and types are a contract. The
contract is versioned (``labelcat.schema_version`` in the file metadata), each
column's meaning travels in the metadata too, and the README table is checked
against ``COLUMNS`` by a test.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .fsutil import atomic_path

SCHEMA_VERSION = "1"
STATUSES = ("labelled", "duplicate", "junk", "error", "seen")

#: (name, arrow type, meaning); pass-through columns go before ``model``.
COLUMNS: list[tuple[str, pa.DataType, str]] = [
    ("row", pa.int64(), "0-based position of the input row (manifest order, or sorted folder walk)"),
    ("sku", pa.string(), "the manifest's sku (or id) cell; null for folder input"),
    ("path", pa.string(), "the path exactly as given in the manifest / found in the folder"),
    ("status", pa.string(), "labelled | duplicate | junk | error | seen (labelled on an earlier night, --store)"),
    ("label", pa.string(), "shop category (duplicates inherit the kept row's); null for errors"),
    ("confidence", pa.float32(), "calibrated probability of label over the shop categories (1.0 for human labels)"),
    ("topk_labels", pa.list_(pa.string()), "the k most likely categories, best first"),
    ("topk_scores", pa.list_(pa.float32()), "their probabilities"),
    ("label_source", pa.string(), "model, or human when a reviewer's correction (matched by sha256) set it"),
    ("duplicate_of", pa.int64(), "row of the kept photo this one duplicates"),
    ("duplicate_of_run", pa.string(), "run_id of that row when it was kept on an earlier night (--store); else null"),
    ("duplicate_kind", pa.string(), "exact (same bytes) | near (perceptual match) | human (a reviewer said so)"),
    ("seen_in", pa.string(), "run_id#row where this same photo was labelled before (status seen)"),
    ("junk_reason", pa.string(), "code: detail, e.g. 'not_product: looks like animal (0.96)'"),
    ("error", pa.string(), "why the photo could not be used: missing, empty, truncated, ... (README)"),
    ("error_detail", pa.string(), "the underlying message"),
    ("sha256", pa.string(), "hex sha256 of the file's bytes"),
    ("phash", pa.string(), "64-bit perceptual hash of the trimmed upright photo, hex"),
    ("phash256", pa.string(), "256-bit perceptual hash used to confirm near matches, hex"),
    ("width", pa.int32(), "pixels, after EXIF orientation"),
    ("height", pa.int32(), "pixels, after EXIF orientation"),
    ("pixel_std", pa.float32(), "greyscale standard deviation (0-255); near-blank photos score low"),
    ("aspect_ratio", pa.float32(), "long side / short side"),
    ("category_hint", pa.string(), "the manifest's category_hint, or the parent folder name"),
    ("hint_category", pa.string(), "the shop category the hint names, if the taxonomy knows it"),
    ("product_evidence", pa.float32(), "ImageNet probability mass on product classes (ImageNet models)"),
    ("imagenet_top", pa.string(), "top ImageNet class and its probability, for reviewers"),
    ("model", pa.string(), "registered model name"),
    ("model_version", pa.string(), "weights digest + taxonomy name, version and digest"),
    ("run_id", pa.string(), "identifier of the run that wrote the row"),
    ("processed_at", pa.timestamp("us", tz="UTC"), "when the run classified the batch"),
]
PASS_THROUGH_BEFORE = "model"


def schema(extra_columns: list[str]) -> pa.Schema:
    """The Arrow schema for a run whose manifest carried ``extra_columns``."""
    fields = []
    for name, typ, doc in COLUMNS:
        if name == PASS_THROUGH_BEFORE:
            fields += [pa.field(c, pa.string(), metadata={"doc": "passed through from the manifest"}) for c in extra_columns]
        fields.append(pa.field(name, typ, metadata={"doc": doc}))
    return pa.schema(fields)


def schema_with_meta(extra_columns: list[str], run_meta: dict[str, Any]) -> pa.Schema:
    """The schema plus file metadata: schema version, column docs, the run's settings."""
    return schema(extra_columns).with_metadata({
        b"labelcat.schema_version": SCHEMA_VERSION.encode(),
        b"labelcat.columns": json.dumps({n: d for n, _, d in COLUMNS}).encode(),
        b"labelcat.run": json.dumps(run_meta, default=str).encode(),
    })


def to_table(rows: list[dict[str, Any]], extra_columns: list[str], run_meta: dict[str, Any]) -> pa.Table:
    """Rows (dicts keyed by column name) → an Arrow table with the run's metadata."""
    sch = schema_with_meta(extra_columns, run_meta)
    return pa.table({f.name: [r.get(f.name) for r in rows] for f in sch}, schema=sch)


def write_parquet(table: pa.Table, out: str | Path) -> Path:
    """Write ``table`` to ``out`` atomically: readers never see a partial file."""
    out = Path(out)
    with atomic_path(out, suffix=".parquet") as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return out


def write_json(obj: Any, out: str | Path) -> Path:
    out = Path(out)
    with atomic_path(out, suffix=".json") as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
    return out


@dataclass
class Summary:
    """What a person (or a monitoring job) wants to know after a run."""

    run_id: str
    out: str
    rows: int
    by_status: dict[str, int]
    by_label: dict[str, int]
    errors: dict[str, int]
    junk: dict[str, int]
    seconds: float
    classified: int
    human_labels: int
    model: str
    model_version: str
    device: str

    @property
    def images_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["images_per_second"] = round(self.images_per_second, 2)
        return d

    def render(self) -> str:
        """Plain-text summary for the terminal and the cron mail."""
        lines = [f"labelcat run {self.run_id}: {self.rows} rows in {self.seconds:.1f}s "
                 f"({self.images_per_second:.1f} rows/s, {self.classified} classified on {self.device})"]
        lines.append("  status: " + ", ".join(f"{s} {self.by_status.get(s, 0)}" for s in STATUSES)
                     + (f" ({self.human_labels} labelled by people)" if self.human_labels else ""))
        if self.by_label:
            lines.append("  labels: " + ", ".join(f"{k} {v}" for k, v in self.by_label.items()))
        if self.junk:
            lines.append("  junk:   " + ", ".join(f"{k} {v}" for k, v in self.junk.items()))
        if self.errors:
            lines.append("  errors: " + ", ".join(f"{k} {v}" for k, v in self.errors.items()))
        lines.append(f"  model:  {self.model} {self.model_version}")
        lines.append(f"  wrote:  {self.out}")
        return "\n".join(lines)


class SummaryCounter:
    """Counts statuses, labels (of labelled rows), junk and error codes, chunk by chunk."""

    def __init__(self) -> None:
        self.rows = 0
        self.by_status: Counter = Counter()
        self.by_label: Counter = Counter()
        self.errors: Counter = Counter()
        self.junk: Counter = Counter()
        self.human = 0
        self.classified = 0

    def update(self, rows: list[dict[str, Any]]) -> None:
        for r in rows:
            self.rows += 1
            self.by_status[r["status"]] += 1
            if r["status"] == "labelled":
                self.by_label[r["label"]] += 1
            elif r["status"] == "error":
                self.errors[r["error"]] += 1
            elif r["status"] == "junk":
                self.junk[(r["junk_reason"] or "").split(":")[0]] += 1
            if r.get("label_source") == "human" and r["status"] in ("labelled", "junk"):
                self.human += 1
            if r["status"] in ("labelled", "junk") and r.get("label_source") is not None and r.get("topk_labels") is not None:
                self.classified += 1

    def summary(self, **fields: Any) -> Summary:
        return Summary(
            rows=self.rows,
            by_status={s: self.by_status.get(s, 0) for s in STATUSES},
            by_label=dict(self.by_label.most_common()),
            errors=dict(self.errors.most_common()),
            junk=dict(self.junk.most_common()),
            human_labels=self.human,
            classified=self.classified,
            **fields,
        )
