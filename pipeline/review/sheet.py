"""Review: the rows a person should look at go out as a spreadsheet; corrections come back.

Why a spreadsheet: it is what a shop's merchandisers already use, offline,
with a thumbnail beside each row and a drop-down of valid labels, so a
correction is one click. What comes back is untrusted input: every row is
validated against the run it came from (known row, untouched key columns,
valid label) and the whole file is refused if any row is wrong, so nothing
is half-applied. Accepted corrections are appended, never rewritten, to a
Parquet store keyed by content hash; ``run`` applies them every night after
(``label_source = "human"``) and ``train`` learns from them.

Formula injection: any text that a spreadsheet could read as a formula
(starting with ``= + - @``, tab or CR) is written as a typed string in xlsx
and prefixed with ``'`` in CSV (OWASP's advice); import strips that prefix.
"""

from __future__ import annotations

import csv
import io
import json
import os
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.ops.fsutil import atomic_path

SHEET = "review"
META_SHEET = "labelcat"
SPECIAL_LABELS = ("junk", "duplicate")
DEFAULT_REVIEW_THRESHOLD = 0.6  # zero-shot models have no card; see README "The review loop"
DEFAULT_CORRECTIONS = "labelcat-output/corrections"
KEY_COLUMNS = ("row", "sku", "path", "sha256")
LEADING_COLUMNS = ("thumbnail", "row", "sku", "path", "label", "confidence", "alternative_2", "alternative_3",
                   "status", "reason")
TRAILING_COLUMNS = ("sha256", "corrected_label", "note")
DANGEROUS_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
THUMB = 72  # pixels
#: The columns a review sheet itself owns; a manifest column of the same name is shown as input_<name>.
SHEET_OWN = frozenset(LEADING_COLUMNS) | frozenset(TRAILING_COLUMNS) | {"run_file"}
MAX_SHEET_COLUMNS = 256  # far more than an exported sheet has; wider sheets are refused
MAX_SHEET_XML_BYTES = 200 * 1024 * 1024  # uncompressed worksheet XML; a zip bomb is refused before parsing

CORRECTIONS_SCHEMA = pa.schema([
    ("sha256", pa.string()), ("corrected_label", pa.string()), ("note", pa.string()),
    ("model_label", pa.string()), ("row", pa.int64()), ("sku", pa.string()), ("path", pa.string()),
    ("source_path", pa.string()), ("run_id", pa.string()), ("reviewer", pa.string()),
    ("imported_at", pa.timestamp("us", tz="UTC")), ("review_file", pa.string()),
])


class ReviewError(ValueError):
    """A review file that cannot be applied; ``problems`` lists every bad row."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass
class RunFile:
    """A run's Parquet output and what its metadata says about it."""

    path: Path
    table: pa.Table
    meta: dict[str, Any]

    @property
    def labels(self) -> list[str]:
        return list(self.meta.get("labels", []))

    @property
    def extra_columns(self) -> list[str]:
        return list(self.meta.get("extra_columns", []))

    def source_path(self, path: str) -> Path:
        return Path(self.meta.get("path_base", ".")) / path


def read_run(path: str | Path) -> RunFile:
    path = Path(path)
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ReviewError([f"{path}: not a readable labelcat Parquet file ({exc})"]) from None
    raw = (table.schema.metadata or {}).get(b"labelcat.run")
    if raw is None:
        raise ReviewError([f"{path}: no labelcat run metadata; was it written by `labelcat run`?"])
    return RunFile(path, table, json.loads(raw))


def safe_text(value: Any) -> Any:
    """CSV cell text that no spreadsheet will evaluate: a leading ' before formula starters.

    A value that already starts with ' gets one more, so ``unsafe_text`` can
    always strip exactly one and a SKU such as ``'=A1`` round-trips.
    """
    if isinstance(value, str) and value.startswith((*DANGEROUS_PREFIXES, "'")):
        return "'" + value
    return value


def unsafe_text(value: Any) -> Any:
    """Undo ``safe_text`` on import."""
    if isinstance(value, str) and value.startswith("'") and value[1:].startswith((*DANGEROUS_PREFIXES, "'")):
        return value[1:]
    return value


def sheet_extra_columns(run: RunFile) -> list[tuple[str, str]]:
    """(sheet header, run column) for the manifest's pass-through columns.

    A manifest column named like one the reviewer fills in (``corrected_label``,
    ``note``, ``reason``...) must never pre-fill it, so it is shown as
    ``input_<name>`` (``_2``... if that is taken too).
    """
    taken = set(SHEET_OWN)
    out = []
    for col in run.extra_columns:
        name, k = (col if col not in taken else f"input_{col}"), 2
        base = name
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        out.append((name, col))
    return out


def rows_to_review(run: RunFile, threshold: float | None = None) -> tuple[list[dict[str, Any]], float]:
    """Low-confidence labelled rows, every junk row and every hint mismatch, least confident first."""
    recorded = run.meta.get("review_threshold")
    t = threshold if threshold is not None else float(recorded if recorded is not None else DEFAULT_REVIEW_THRESHOLD)
    picked = []
    rows = run.table.to_pylist()
    if "needs_review" in run.table.column_names:  # the run decided; --threshold can only add low-confidence rows
        for r in rows:
            if r["needs_review"]:
                picked.append({**r, "reason": r["review_reason"]})
            elif (threshold is not None and r["status"] == "labelled" and r.get("label_source") != "human"
                  and r["confidence"] is not None and r["confidence"] < t):
                picked.append({**r, "reason": f"low_confidence: {r['confidence']:.2f} < {t}"})
        picked.sort(key=lambda r: (r["confidence"] if r["confidence"] is not None else -1.0, r["row"]))
        return picked, t
    for r in rows:  # files written before needs_review existed
        if r["status"] == "junk":
            reason = r["junk_reason"]
        elif r["status"] != "labelled":
            continue
        elif r.get("label_source") == "human":
            continue  # a person already decided
        elif r["hint_category"] and r["label"] != r["hint_category"]:
            reason = f"hint_mismatch: filed as {r['hint_category']}, model says {r['label']}"
        elif r["confidence"] is not None and r["confidence"] < t:
            reason = f"low_confidence: {r['confidence']:.2f} < {t}"
        else:
            continue
        picked.append({**r, "reason": reason})
    picked.sort(key=lambda r: (r["confidence"] if r["confidence"] is not None else -1.0, r["row"]))
    return picked, t


def _columns(run: RunFile) -> list[str]:
    return [*LEADING_COLUMNS, *(h for h, _ in sheet_extra_columns(run)), *TRAILING_COLUMNS]


def _cells(r: dict[str, Any], run: RunFile) -> dict[str, Any]:
    alts = list(r.get("topk_labels") or [])[1:3]
    scores = list(r.get("topk_scores") or [])[1:3]
    alt = [f"{a} ({s:.2f})" for a, s in zip(alts, scores)] + ["", ""]
    cells = {
        "row": r["row"], "sku": r["sku"], "path": r["path"], "label": r["label"],
        "confidence": round(r["confidence"], 4) if r["confidence"] is not None else None,
        "alternative_2": alt[0], "alternative_3": alt[1], "status": r["status"], "reason": r["reason"],
        "sha256": r["sha256"], "corrected_label": None, "note": None,
    }
    cells.update({header: r.get(col) for header, col in sheet_extra_columns(run)})
    return cells


def _thumbnail(path: Path) -> bytes | None:
    from pipeline.stages.decode import DecodeError, decode, read_bytes

    try:
        img = decode(read_bytes(path), min_side=THUMB)
    except DecodeError:
        return None
    img.thumbnail((THUMB, THUMB), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def export(run_path: str | Path, out: str | Path, threshold: float | None = None) -> tuple[Path, int]:
    """Write the review workbook (``.xlsx``) or its CSV variant (``.csv``); returns (path, rows)."""
    run = read_run(run_path)
    rows, t = rows_to_review(run, threshold)
    out = Path(out)
    if out.suffix.lower() == ".csv":
        _export_csv(run, rows, out)
    else:
        _export_xlsx(run, rows, out, t)
    return out, len(rows)


def _export_csv(run: RunFile, rows: list[dict[str, Any]], out: Path) -> None:
    """A plain CSV (header on the first line, so pandas and spreadsheets read it as is); the run's
    address is the ``run_file`` column, so ``review import`` needs no ``--run``."""
    cols = [c for c in _columns(run) if c != "thumbnail"] + ["run_file"]
    run_file = str(run.path.resolve())
    with atomic_path(out, suffix=".csv") as tmp:
        with open(tmp, "w", encoding="utf-8-sig", newline="") as fh:
            w = csv.writer(fh)
            w.writerow([safe_text(c) for c in cols])
            for r in rows:
                cells = {**_cells(r, run), "run_file": run_file}
                w.writerow([safe_text(flat_value(cells.get(c))) for c in cols])


def _put(ws, row: int, col: int, value: Any):
    """A cell that is never a formula, whatever text it holds (headers and metadata included)."""
    cell = ws.cell(row=row, column=col, value=value)
    if isinstance(value, str):
        cell.data_type = "s"
    return cell


def _export_xlsx(run: RunFile, rows: list[dict[str, Any]], out: Path, threshold: float) -> None:
    from openpyxl import Workbook
    from openpyxl.drawing.image import Image as XLImage
    from openpyxl.styles import Alignment, Font, PatternFill
    from openpyxl.utils import get_column_letter
    from openpyxl.worksheet.datavalidation import DataValidation

    cols = _columns(run)
    wb = Workbook()
    ws = wb.active
    ws.title = SHEET
    meta = wb.create_sheet(META_SHEET)
    valid = run.labels + list(SPECIAL_LABELS)
    for i, values in enumerate((["run_id", run.meta["run_id"]], ["run_file", str(run.path.resolve())],
                                ["threshold", threshold], ["labels"] + valid), start=1):
        for j, v in enumerate(values, start=1):
            _put(meta, i, j, v)
    meta.sheet_state = "hidden"

    for j, c in enumerate(cols, start=1):
        cell = _put(ws, 1, j, c)
        cell.font = Font(bold=True)
        cell.fill = PatternFill("solid", fgColor="DDE6F0")
    ws.freeze_panes = "B2"
    for i, r in enumerate(rows, start=2):
        cells = _cells(r, run)
        for j, c in enumerate(cols, start=1):
            if c == "thumbnail":
                continue
            cell = _put(ws, i, j, cells.get(c))
            cell.alignment = Alignment(vertical="center", wrap_text=c in ("reason", "path"))
        ws.row_dimensions[i].height = THUMB * 0.78  # points
        thumb = _thumbnail(run.source_path(r["path"]))
        if thumb:
            img = XLImage(io.BytesIO(thumb))
            img.anchor = f"A{i}"
            ws.add_image(img)
    widths = {"thumbnail": 11, "row": 6, "sku": 14, "path": 36, "label": 16, "confidence": 11, "alternative_2": 22,
              "alternative_3": 22, "status": 10, "reason": 42, "sha256": 16, "corrected_label": 18, "note": 30}
    for j, c in enumerate(cols, start=1):
        ws.column_dimensions[get_column_letter(j)].width = widths.get(c, 16)
    if rows:
        col = get_column_letter(cols.index("corrected_label") + 1)
        last = get_column_letter(len(valid) + 1)
        dv = DataValidation(type="list", formula1=f"{META_SHEET}!$B$4:${last}$4", allow_blank=True,
                            showErrorMessage=True, errorTitle="Not a label",
                            error="Choose a label from the list (or leave empty).")
        dv.add(f"{col}2:{col}{len(rows) + 1}")
        ws.add_data_validation(dv)
        ws.cell(row=1, column=cols.index("corrected_label") + 1).fill = PatternFill("solid", fgColor="FFF2B3")
    with atomic_path(out, suffix=".xlsx") as tmp:
        wb.save(tmp)


@dataclass
class Correction:
    row: int
    corrected_label: str
    note: str | None


def _read_csv(path: Path, max_rows: int, refuse_more: bool = True) -> list[list[str]]:
    """The CSV's lines, at most ``max_rows`` + 1 (header); a larger (unless ``refuse_more`` is off, then
    the rest is not read) or non-UTF-8 file is refused with one line."""
    lines: list[list[str]] = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            for cells in csv.reader(fh):
                if len(lines) > max_rows and not refuse_more:
                    break
                lines.append(cells[:MAX_SHEET_COLUMNS + 1])
                if len(lines) > max_rows + 1 or len(cells) > MAX_SHEET_COLUMNS:
                    raise ReviewError([f"{path}: larger than any review of this run ({max_rows} rows, "
                                       f"{MAX_SHEET_COLUMNS} columns at most); refused"])
    except UnicodeDecodeError:
        raise ReviewError([f"{path}: not UTF-8 text; save the CSV as UTF-8 (the export wrote UTF-8)"]) from None
    except csv.Error as exc:
        raise ReviewError([f"{path}: not valid CSV ({exc})"]) from None
    return lines


def _open_workbook(path: Path):
    """openpyxl's read-only workbook, after checking the zip: not a zip, or worksheets that would inflate
    past ``MAX_SHEET_XML_BYTES``, are refused with one line."""
    import zipfile

    from openpyxl import load_workbook
    from openpyxl.utils.exceptions import InvalidFileException

    try:
        with zipfile.ZipFile(path) as zf:
            inflated = sum(i.file_size for i in zf.infolist() if i.filename.startswith("xl/worksheets/"))
    except (zipfile.BadZipFile, OSError) as exc:
        raise ReviewError([f"{path}: not a readable xlsx workbook ({exc})"]) from None
    if inflated > MAX_SHEET_XML_BYTES:
        raise ReviewError([f"{path}: its sheets inflate to {inflated} bytes; refused as a zip bomb"])
    try:
        return load_workbook(path, read_only=True, data_only=True)
    except (InvalidFileException, zipfile.BadZipFile, OSError, KeyError, ValueError) as exc:
        raise ReviewError([f"{path}: not a readable xlsx workbook ({exc})"]) from None


def _read_sheet(path: Path, max_rows: int) -> tuple[list[str], list[tuple[int, dict[str, Any]]], str]:
    """(header, [(sheet row number, cells)], sheet name) from an exported xlsx or csv.

    At most ``max_rows`` data rows and ``MAX_SHEET_COLUMNS`` columns are read
    (an exported sheet never has more rows than its run): a sheet whose
    ``<dimension>`` claims a million rows costs nothing, and a larger one is refused.
    """
    if path.suffix.lower() == ".csv":
        lines = _read_csv(path, max_rows)
        if not lines:
            raise ReviewError([f"{path}: not a labelcat review CSV (no header)"])
        header = [unsafe_text(h) for h in lines[0]]
        body = [(n, {h: unsafe_text(v) if v != "" else None for h, v in zip(header, cells)})
                for n, cells in enumerate(lines[1:], start=2) if any(c.strip() for c in cells)]
        return header, body, "csv"
    wb = _open_workbook(path)
    if SHEET not in wb.sheetnames:
        raise ReviewError([f"{path}: no sheet named {SHEET!r}"])
    ws = wb[SHEET]
    claimed_rows, claimed_cols = ws.max_row or 0, ws.max_column or 0  # the sheet's <dimension>, read without the cells
    if claimed_rows > max_rows + 1 or claimed_cols > MAX_SHEET_COLUMNS:
        wb.close()
        raise ReviewError([f"{path}: sheet {SHEET!r} claims {claimed_rows} rows x {claimed_cols} columns, more than a "
                           f"review of this run has ({max_rows + 1} rows, {MAX_SHEET_COLUMNS} columns at most); refused"])
    values = list(ws.iter_rows(max_row=max_rows + 1, max_col=MAX_SHEET_COLUMNS, values_only=True))
    wb.close()
    if not values:
        raise ReviewError([f"{path}: sheet {SHEET!r} is empty"])
    header = [str(h) if h is not None else "" for h in values[0]]
    body = [(n, dict(zip(header, cells))) for n, cells in enumerate(values[1:], start=2)
            if any(c not in (None, "") for c in cells)]
    return header, body, SHEET


def _as_text(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    s = str(v)
    return s if s.strip() else None


def validate(path: str | Path, run: RunFile) -> list[Correction]:
    """Every correction in the sheet, or ``ReviewError`` listing every bad row (nothing applied)."""
    path = Path(path)
    header, body, sheet = _read_sheet(path, run.table.num_rows)
    need = [c for c in _columns(run) if c != "thumbnail" or sheet != "csv"]
    missing = [c for c in ("row", "sku", "path", "sha256", "corrected_label") if c not in header]
    if missing:
        raise ReviewError([f"{path}: sheet {sheet!r} lacks column(s) {', '.join(missing)} (expected {', '.join(need)})"])
    by_row = {r["row"]: r for r in run.table.select(["row", "sku", "path", "sha256", "label"]).to_pylist()}
    valid = set(run.labels) | set(SPECIAL_LABELS)
    canonical = {v.lower(): v for v in valid}
    problems, out, seen = [], [], set()
    for n, cells in body:
        where = f"sheet {sheet!r} row {n}"
        raw_row = cells.get("row")
        try:
            row = int(raw_row)
        except (TypeError, ValueError):
            problems.append(f"{where}: row {raw_row!r} is not a row number")
            continue
        if row not in by_row:
            problems.append(f"{where}: row {row} is not in run {run.meta['run_id']}")
            continue
        if row in seen:
            problems.append(f"{where}: row {row} appears twice")
        seen.add(row)
        for key in ("sku", "path", "sha256"):
            if _as_text(cells.get(key)) != _as_text(by_row[row][key]):
                problems.append(f"{where}: {key} was edited ({_as_text(cells.get(key))!r}, run has {by_row[row][key]!r})")
        label = _as_text(cells.get("corrected_label"))
        if label is None:
            continue
        label = canonical.get(label.strip().lower(), label.strip())  # any case in, the run's spelling stored
        if label not in valid:
            problems.append(f"{where}: corrected_label {label!r} is not a valid label (valid: {', '.join(sorted(valid))})")
            continue
        out.append(Correction(row, label, _as_text(cells.get("note"))))
    if problems:
        raise ReviewError(problems)
    return out


def import_review(path: str | Path, run_path: str | Path | None, store: str | Path, reviewer: str) -> tuple[int, Path | None]:
    """Validate a filled review file and append its corrections to the store; returns (count, part file)."""
    path = Path(path)
    if run_path is None:
        run_path = _run_file_from_workbook(path)
    run = read_run(run_path)
    corrections = validate(path, run)
    if not corrections:
        return 0, None
    rows = {r["row"]: r for r in run.table.to_pylist()}
    now = datetime.now(timezone.utc)
    records = [{
        "sha256": rows[c.row]["sha256"], "corrected_label": c.corrected_label, "note": c.note,
        "model_label": rows[c.row]["label"], "row": c.row, "sku": rows[c.row]["sku"], "path": rows[c.row]["path"],
        "source_path": str(run.source_path(rows[c.row]["path"]).resolve()), "run_id": run.meta["run_id"],
        "reviewer": reviewer, "imported_at": now, "review_file": path.name,
    } for c in corrections]
    store = Path(store)
    part = store / f"part-{now:%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:8]}.parquet"
    with atomic_path(part, suffix=".parquet") as tmp:
        pq.write_table(pa.Table.from_pylist(records, schema=CORRECTIONS_SCHEMA), tmp)
    return len(records), part


def _run_file_from_workbook(path: Path) -> Path:
    """The run's Parquet file as the export recorded it (hidden sheet, or the CSV's ``run_file`` column)."""
    if path.suffix.lower() == ".csv":
        lines = _read_csv(path, 1, refuse_more=False)
        if len(lines) < 2 or "run_file" not in lines[0]:
            raise ReviewError([f"{path}: no run_file column; pass --run RUN.parquet"])
        return Path(unsafe_text(lines[1][lines[0].index("run_file")]))
    wb = _open_workbook(path)
    if META_SHEET not in wb.sheetnames:
        raise ReviewError([f"{path}: no {META_SHEET!r} sheet; pass --run RUN.parquet"])
    meta = {r[0]: r[1] for r in wb[META_SHEET].iter_rows(max_row=10, max_col=2, values_only=True) if r and r[0]}
    wb.close()
    if not meta.get("run_file"):
        raise ReviewError([f"{path}: the {META_SHEET!r} sheet names no run_file; pass --run RUN.parquet"])
    return Path(str(meta["run_file"]))


def load_corrections(store: str | Path) -> dict[str, dict[str, Any]]:
    """Latest correction per content hash from an append-only store (empty if none)."""
    store = Path(store)
    parts = sorted(store.glob("part-*.parquet")) if store.is_dir() else []
    latest: dict[str, dict[str, Any]] = {}
    for part in parts:
        for r in pq.read_table(part, schema=CORRECTIONS_SCHEMA).to_pylist():
            if r["sha256"] not in latest or r["imported_at"] >= latest[r["sha256"]]["imported_at"]:
                latest[r["sha256"]] = r
    return latest


def apply_corrections(rows: list[dict[str, Any]], corrections: dict[str, dict[str, Any]],
                      vocabulary: Callable[[str], str | None] | None = None,
                      refused: Callable[[str], None] | None = None) -> int:
    """Give rows a person labelled the person's label (``label_source="human"``); returns how many.

    ``vocabulary`` maps a corrected label into the active model's label set
    (``Classifier.hint_category``: taxonomy aliases, or the same name in any
    case), so one output never mixes two vocabularies; a label it cannot map
    is not applied and ``refused`` hears about it once per label.
    """
    applied = 0
    told: set[str] = set()
    for r in rows:
        c = corrections.get(r.get("sha256") or "")
        if c is None or r["status"] in ("error", "duplicate"):  # duplicates inherit from their kept row
            continue
        label = c["corrected_label"]
        if label not in SPECIAL_LABELS and vocabulary is not None:
            mapped = vocabulary(label)
            if mapped is None:
                if refused is not None and label not in told:
                    refused(f"correction label {label!r} is not a label of the active model; not applied "
                            "(retrain on the corrections, or correct again in the model's labels)")
                    told.add(label)
                continue
            label = mapped
        note = f" ({c['note']})" if c["note"] else ""
        seen = r["status"] == "seen"  # a row of an earlier night stays seen (--skip-seen): it only takes the verdict
        if label == "junk":  # a person's verdict: no model label survives it
            r.update(status="junk", junk_reason=f"human: marked junk by {c['reviewer']}{note}", label_source="human",
                     label=None, confidence=None, topk_labels=None, topk_scores=None)
        elif label == "duplicate":
            r.update(status="duplicate", duplicate_kind="human", label_source="human")
        else:
            r.update(status="labelled", label=label, confidence=1.0, label_source="human", junk_reason=None)
        if seen:
            r["status"] = "seen"
        r.update(needs_review=False, review_reason=None)
        applied += 1
    return applied


def corrections_store_exists(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and any(p.glob("part-*.parquet"))


def reviewer_name() -> str:
    return os.environ.get("LABELCAT_REVIEWER") or os.environ.get("USER") or os.environ.get("USERNAME") or "unknown"


def corrections_batch(store: str | Path):
    """The store's human labels as ingest records (junk/duplicate verdicts are not training labels)."""
    from pipeline.stages.ingest import Batch, Record

    records = []
    for c in sorted(load_corrections(store).values(), key=lambda c: (c["imported_at"], c["row"])):
        if c["corrected_label"] in SPECIAL_LABELS:
            continue
        records.append(Record(row=len(records), path=c["source_path"], resolved=Path(c["source_path"]),
                              sku=c["sku"], category_hint=None, extra={"label": c["corrected_label"]}))
    return Batch(records, ["label"], "corrections", {"label": "label"})


def flat_value(v: Any) -> Any:
    """A Parquet value as one spreadsheet cell: lists joined with `` | ``, whole floats as integers,
    timestamps in ISO form, formula starters neutralised by the writer."""
    if isinstance(v, (list, tuple)):
        return " | ".join(f"{x:.4f}" if isinstance(x, float) else str(x) for x in v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, datetime):
        return v.isoformat()
    return v


def export_table(run_path: str | Path, out: str | Path) -> tuple[Path, int]:
    """Every row of a run as a flat CSV or xlsx (one row per photo), for people who don't read Parquet."""
    run = read_run(run_path)
    out = Path(out)
    cols = run.table.column_names
    rows = run.table.to_pylist()
    if out.suffix.lower() == ".csv":
        with atomic_path(out, suffix=".csv") as tmp:
            with open(tmp, "w", encoding="utf-8-sig", newline="") as fh:
                w = csv.writer(fh)
                w.writerow([safe_text(c) for c in cols])
                for r in rows:
                    w.writerow([safe_text(flat_value(r[c])) for c in cols])
    else:
        from openpyxl import Workbook

        wb = Workbook(write_only=False)
        ws = wb.active
        ws.title = "labels"
        for j, c in enumerate(cols, start=1):
            _put(ws, 1, j, c)
        for i, r in enumerate(rows, start=2):
            for j, c in enumerate(cols, start=1):
                _put(ws, i, j, flat_value(r[c]))
        ws.freeze_panes = "A2"
        with atomic_path(out, suffix=".xlsx") as tmp:
            wb.save(tmp)
    return out, len(rows)
