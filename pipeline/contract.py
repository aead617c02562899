"""The output contract: every column labelcat writes, its Arrow type and meaning, and the statuses.

Why one module: the Parquet schema, the names a manifest column must not take
(renamed ``input_<name>``), the fields a duplicate inherits and the store's
index are all read off this list, so they cannot drift apart. The shop's
inventory system reads the file unattended; the README table is checked
against ``COLUMNS`` by a test.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import pyarrow as pa

SCHEMA_VERSION = "1"


class Status(str, Enum):
    """What happened to one input row (the ``status`` column)."""

    LABELLED = "labelled"
    DUPLICATE = "duplicate"
    JUNK = "junk"
    ERROR = "error"
    SEEN = "seen"

    def __str__(self) -> str:
        return self.value


STATUSES: tuple[str, ...] = tuple(s.value for s in Status)


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    doc: str
    label: bool = False  # part of the label decision: inherited by duplicates, kept in the store's index
    indexed: bool = False  # kept in the store's index for later nights


COLUMNS: tuple[Column, ...] = (
    Column("row", pa.int64(), "0-based position of the input row (manifest order, or sorted folder walk)", indexed=True),
    Column("sku", pa.string(), "the manifest's sku (or id) cell; null for folder input"),
    Column("path", pa.string(), "the path exactly as given in the manifest / found in the folder"),
    Column("status", pa.string(), "labelled | duplicate | junk | error | seen (labelled on an earlier night, --store)",
           indexed=True),
    Column("label", pa.string(), "shop category (duplicates inherit the kept row's); null for errors", label=True),
    Column("confidence", pa.float32(), "calibrated probability of label over the shop categories (1.0 for human labels)",
           label=True),
    Column("topk_labels", pa.list_(pa.string()), "the k most likely categories, best first", label=True),
    Column("topk_scores", pa.list_(pa.float32()), "their probabilities", label=True),
    Column("label_source", pa.string(), "model; hint when the folder or hint outweighed the photo's own top category "
           "(--hint-trust); neighbours when, without a folder or hint, the night's most alike photos did; human when "
           "a reviewer's correction (matched by sha256) set it", label=True),
    Column("duplicate_of", pa.int64(), "row of the kept photo this one duplicates"),
    Column("duplicate_of_run", pa.string(), "run_id of that row when it was kept on an earlier night (--store); else null"),
    Column("duplicate_kind", pa.string(), "exact (same bytes) | near (perceptual match) | human (a reviewer said so)"),
    Column("seen_in", pa.string(), "run_id#row where this same photo was labelled before (status seen)"),
    Column("junk_reason", pa.string(), "code: detail, e.g. 'not_product: looks like animal (0.96)'", indexed=True),
    Column("needs_review", pa.bool_(), "a person should look: junk, a hint mismatch or outlier, or confidence under the "
           "run's review threshold; false once a person decided (the rows `review export` picks)"),
    Column("review_reason", pa.string(), "why it needs review: junk: <code>, hint_mismatch, hint_decided, hint_outlier, "
           "low_confidence"),
    Column("error", pa.string(), "why the photo could not be used: missing, empty, truncated, ... (README)"),
    Column("error_detail", pa.string(), "the underlying message"),
    Column("sha256", pa.string(), "hex sha256 of the file's bytes", indexed=True),
    Column("phash", pa.string(), "64-bit perceptual hash of the trimmed upright photo, hex", indexed=True),
    Column("phash256", pa.string(), "256-bit perceptual hash used to confirm near matches, hex", indexed=True),
    Column("width", pa.int32(), "pixels, after EXIF orientation"),
    Column("height", pa.int32(), "pixels, after EXIF orientation"),
    Column("pixel_std", pa.float32(), "greyscale standard deviation (0-255); near-blank photos score low"),
    Column("aspect_ratio", pa.float32(), "long side / short side"),
    Column("category_hint", pa.string(), "the manifest's category_hint, or the parent folder name", indexed=True),
    Column("hint_category", pa.string(), "the shop category the hint names, if the taxonomy knows it"),
    Column("product_evidence", pa.float32(), "ImageNet probability mass on product classes (ImageNet models)", label=True),
    Column("imagenet_top", pa.string(), "top ImageNet class and its probability, for reviewers", label=True),
    Column("model", pa.string(), "registered model name"),
    Column("model_version", pa.string(), "weights digest + taxonomy name, version and digest", indexed=True),
    Column("run_id", pa.string(), "identifier of the run that wrote the row", indexed=True),
    Column("processed_at", pa.timestamp("us", tz="UTC"), "when the run classified the batch"),
    Column("embedding", pa.list_(pa.float16()), "with --embeddings: the pooled features the model's last layer read "
           "(float16, the model's width); null otherwise and for rows not classified tonight"),
)
BY_NAME: dict[str, Column] = {c.name: c for c in COLUMNS}
#: Manifest columns are passed through just before this output column.
PASS_THROUGH_BEFORE = "model"
#: Columns labelcat writes itself (compared case-insensitively with a manifest's header).
RESERVED_COLUMNS: frozenset[str] = frozenset(c.name for c in COLUMNS)
#: The label decision: what a duplicate inherits from its kept row and the store remembers.
LABEL_FIELDS: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.label)
#: Contract columns the store's index keeps (with the label fields).
INDEXED_FIELDS: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.indexed or c.label)


def pass_through_names(header: list[str]) -> list[str]:
    """Output names for a manifest's extra columns: nothing the shop sent is lost or overwritten.

    A name labelcat writes itself becomes ``input_<name>``; if that is taken
    too (by another manifest column or an output column), ``_2``, ``_3``...
    follow. Names that are free keep their spelling, so they are claimed first.
    Empty header cells become ``column_<i>``.
    """
    names = [h.strip() or f"column_{i}" for i, h in enumerate(header)]
    taken = {n.lower() for n in RESERVED_COLUMNS}
    out: list[str | None] = [None] * len(names)
    for i, n in enumerate(names):  # free names first
        if n.lower() not in taken:
            out[i] = n
            taken.add(n.lower())
    for i, n in enumerate(names):
        if out[i] is None:
            base = n if n.lower() not in RESERVED_COLUMNS else f"input_{n}"
            cand, k = base, 2
            while cand.lower() in taken:
                cand, k = f"{base}_{k}", k + 1
            out[i] = cand
            taken.add(cand.lower())
    return [n for n in out if n is not None]


def output_schema(extra_columns: list[str]) -> pa.Schema:
    """The Arrow schema of a run whose manifest carried ``extra_columns`` (already renamed)."""
    fields = []
    for c in COLUMNS:
        if c.name == PASS_THROUGH_BEFORE:
            fields += [pa.field(n, pa.string(), metadata={"doc": "passed through from the manifest"}) for n in extra_columns]
        fields.append(pa.field(c.name, c.type, metadata={"doc": c.doc}))
    return pa.schema(fields)
