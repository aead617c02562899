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

from pipeline.contract import COLUMNS, SCHEMA_VERSION, STATUSES, output_schema
from pipeline.ops.fsutil import atomic_path

def schema_with_meta(extra_columns: list[str], run_meta: dict[str, Any]) -> pa.Schema:
    """The schema plus file metadata: schema version, column docs, the run's settings."""
    return output_schema(extra_columns).with_metadata({
        b"labelcat.schema_version": SCHEMA_VERSION.encode(),
        b"labelcat.columns": json.dumps({c.name: c.doc for c in COLUMNS}).encode(),
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
        shown = [s for s in STATUSES if s != "seen" or self.by_status.get(s)]  # seen only exists with --store
        lines.append("  status: " + ", ".join(f"{s} {self.by_status.get(s, 0)}" for s in shown)
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

    #: The columns ``update`` reads: a chunk's table is counted from these alone, not turned whole into
    #: Python dicts (top-k lists, hashes and all) just to be counted.
    COLUMNS = ("status", "label", "error", "junk_reason", "label_source", "topk_labels")

    def update_table(self, table: pa.Table) -> None:
        """Count a chunk's output table."""
        self.update(table.select(list(self.COLUMNS)).to_pylist())

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
