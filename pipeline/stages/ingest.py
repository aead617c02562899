"""Ingest: a folder tree or a CSV manifest becomes a list of input records.

Why so strict about the manifest and so lenient about rows: a manifest we
cannot interpret (no path column, binary, empty) means the whole job is
misconfigured, so the run stops with a usage error before touching anything.
A single bad row, though, is tonight's normal: it becomes a record that later
stages turn into an ``error`` row, and the other rows carry on.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.contract import pass_through_names

PATH_COLUMNS = ("path", "image")
ID_COLUMNS = ("sku", "id")
HINT_COLUMN = "category_hint"
class IngestError(ValueError):
    """The input as a whole cannot be used (a usage error, exit status 2)."""


@dataclass
class Record:
    """One input row, before any stage has looked at the file."""

    row: int
    path: str  # as written in the manifest / found in the folder
    resolved: Path  # where we actually read it from
    sku: str | None = None
    category_hint: str | None = None
    extra: dict[str, str] = field(default_factory=dict)
    error: tuple[str, str] | None = None  # (code, detail) known before reading


@dataclass
class Batch:
    """Everything ingest found: the records (streamed, in input order) and the pass-through columns.

    ``records`` is an iterable that may be consumed once; a million-row
    manifest is never held in memory.
    """

    records: Iterable[Record]
    extra_columns: list[str]
    source: str  # "directory", "manifest" or "corrections"
    renamed: dict[str, str] = field(default_factory=dict)  # manifest header (lower case) -> pass-through name

    def column(self, name: str) -> str | None:
        """The pass-through name of the manifest's column ``name`` (``label`` -> ``input_label``), if present."""
        return self.renamed.get(name.lower())


def ingest(source: str | os.PathLike, allow_outside: bool = False) -> Batch:
    """Read a directory tree or a CSV manifest; raise ``IngestError`` if unusable.

    ``allow_outside``: paths that leave the input's folder (a manifest's ``../``
    or absolute paths, a folder's symlinks to files elsewhere) are refused per
    row (``outside_manifest``) unless allowed: one rule for both inputs, so
    neither can make the job read arbitrary files.
    """
    path = Path(source)
    if path.is_dir():
        return Batch(walk_directory(path, allow_outside), [], "directory")
    if not path.exists():
        raise IngestError(f"input {str(source)!r} does not exist")
    if not path.is_file():
        raise IngestError(f"input {str(source)!r} is neither a folder nor a CSV manifest")
    return read_manifest(path, allow_outside)


def walk_directory(root: Path, allow_outside: bool = False) -> Iterator[Record]:
    """Every non-hidden file below ``root``, sorted; the parent folder is the hint.

    Symlinked folders are not followed (no loops); symlinked files are listed
    and a dangling one becomes a ``missing`` row. A folder that cannot be
    listed (permissions, I/O) becomes one ``unreadable`` row for the folder,
    so its photos never vanish without a trace.
    """
    row = 0
    failed: list[OSError] = []

    def unlisted() -> Iterator[Record]:
        nonlocal row
        while failed:
            exc = failed.pop(0)
            folder = Path(exc.filename) if exc.filename else root
            yield Record(row=row, path=display_path(folder), resolved=folder, sku=None,
                         category_hint=display_path(folder.name) or None,
                         error=("unreadable", f"folder cannot be listed: {exc.strerror or exc}"))
            row += 1

    inside = Containment(root)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=failed.append):
        yield from unlisted()
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            full = Path(dirpath) / name
            rec = Record(
                row=row,
                path=display_path(full),
                resolved=full,
                sku=None,
                category_hint=display_path(Path(dirpath).name) or None,
            )
            if not allow_outside and full.is_symlink() and full.exists() and not inside(full):
                rec.error = ("outside_manifest", "the symlink leaves the input folder (use --allow-outside)")
            yield rec
            row += 1
    yield from unlisted()


def display_path(path: str | os.PathLike) -> str:
    """A file name as text that any Parquet reader accepts.

    POSIX file names are bytes; one that is not valid UTF-8 (``caf\\xe9.jpg`` from
    an old Latin-1 upload tool) cannot be stored in a Parquet string column, so
    its undecodable bytes are written as ``\\xNN`` escapes. The file itself is
    still read through its real name.
    """
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _pick(header: list[str], names: tuple[str, ...]) -> int | None:
    lowered = [h.strip().lower() for h in header]
    for name in names:
        if name in lowered:
            return lowered.index(name)
    return None


def read_manifest(path: Path, allow_outside: bool = False) -> Batch:
    """Parse a manifest: UTF-8 (BOM or not), RFC 4180 quoting, comma/semicolon/tab.

    The header and the first row are checked now (so an unusable manifest is a
    usage error before any work); the rows are streamed when iterated.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(65536)
    except OSError as exc:
        raise IngestError(f"cannot read manifest {str(path)!r}: {exc.strerror or exc}") from None
    if not head.strip():
        raise IngestError(f"manifest {str(path)!r} is empty")
    if b"\x00" in head:
        raise IngestError(f"manifest {str(path)!r} is not a CSV file (binary content)")
    try:
        sample = head.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not merely a multi-byte char cut at the sample's end
            raise IngestError(f"manifest {str(path)!r} is not UTF-8 text") from None
        sample = head[: exc.start].decode("utf-8-sig")
    first_line = sample.splitlines()[0] if sample.splitlines() else ""
    delimiter = max(",;\t", key=first_line.count) if first_line else ","
    if first_line.count(delimiter) == 0:
        delimiter = ","

    rows = _manifest_rows(path, delimiter)
    try:
        header = next(rows, None)
        if not header or not any(h.strip() for h in header):
            raise IngestError(f"manifest {str(path)!r} is empty")
        lowered = [h.strip().lower() for h in header]
        dupes = sorted({h for h in lowered if lowered.count(h) > 1 and h})
        if dupes:
            raise IngestError(f"manifest {str(path)!r} repeats column(s) {', '.join(dupes)}")
        path_col = _pick(header, PATH_COLUMNS)
        if path_col is None:
            raise IngestError(
                f"manifest {str(path)!r} has no path column (expected one of: {', '.join(PATH_COLUMNS)}; "
                f"found: {', '.join(h.strip() for h in header)})"
            )
        if next(rows, None) is None:
            raise IngestError(f"manifest {str(path)!r} has a header but no rows")
    finally:
        rows.close()
    id_col = _pick(header, ID_COLUMNS)
    hint_col = _pick(header, (HINT_COLUMN,))
    extra_idx = [i for i in range(len(header)) if i not in (path_col, id_col, hint_col)]
    extra_names = pass_through_names([header[i].strip() or f"column_{i}" for i in extra_idx])
    base = path.parent

    def records() -> Iterator[Record]:
        data = _manifest_rows(path, delimiter)
        next(data)  # header
        inside = None if allow_outside else Containment(base)  # one per night: its folder cache is tonight's
        for row, cells in enumerate(data):
            yield _record_from_cells(row, cells, header, path_col, id_col, hint_col, extra_idx, extra_names, base,
                                     inside)

    renamed = {header[i].strip().lower(): n for i, n in zip(extra_idx, extra_names) if header[i].strip()}
    return Batch(records(), extra_names, "manifest", renamed)


MAX_CELL = 65536  # characters; a longer cell makes its row an error row, not the night's failure
csv.field_size_limit(16 * 1024 * 1024)  # read long cells so they fail their own row only


class BadRow(list):
    """A manifest row that could not be read as CSV: its cells so far and why."""

    def __init__(self, cells: list[str], why: str) -> None:
        super().__init__(cells)
        self.why = why


def _manifest_rows(path: Path, delimiter: str) -> Iterator[list[str]]:
    """Non-blank CSV rows of the manifest, header first.

    Bytes that are not UTF-8 are kept as surrogate escapes and a CSV syntax
    error ends only its own row (``BadRow``): one bad row must not fail a
    night whose other rows are fine.
    """
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield BadRow([], f"not valid CSV: {exc}")
                continue
            if cells and not (len(cells) == 1 and not cells[0].strip()):
                yield cells


def _row_problem(cells: list[str]) -> str | None:
    """Why a row's cells cannot be used as they are (bad bytes, a huge cell), or None."""
    if isinstance(cells, BadRow):
        return cells.why
    for i, c in enumerate(cells):
        if len(c) > MAX_CELL:
            return f"cell {i + 1} has {len(c)} characters (limit {MAX_CELL})"
        if _has_surrogates(c):
            bad = c.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            return f"cell {i + 1} is not UTF-8 text: {bad[:80]!r}"
    return None


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _clean(cell: str | None) -> str | None:
    """A cell as text any Parquet reader accepts: undecodable bytes as \\xNN escapes, huge cells cut."""
    if cell is None:
        return None
    if _has_surrogates(cell):
        cell = cell.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return cell if len(cell) <= MAX_CELL else cell[:MAX_CELL] + "..."


def _record_from_cells(
    row: int,
    cells: list[str],
    header: list[str],
    path_col: int,
    id_col: int | None,
    hint_col: int | None,
    extra_idx: list[int],
    extra_names: list[str],
    base: Path,
    inside: "Containment | None",
) -> Record:
    problem = _row_problem(cells)

    def cell(i: int | None) -> str | None:
        if i is None or i >= len(cells):
            return None
        value = _clean(cells[i])
        return value if value and value.strip() else None

    raw_path = cell(path_col) or ""
    rec = Record(
        row=row,
        path=raw_path,
        resolved=(base / raw_path.strip()) if raw_path.strip() else base,
        sku=cell(id_col),
        category_hint=cell(hint_col),
        extra={name: (_clean(cells[i]) if i < len(cells) else None) for name, i in zip(extra_names, extra_idx)},
    )
    if problem is not None:
        rec.error = ("malformed_row", problem)
    elif not raw_path.strip():
        rec.error = ("no_path", "the path cell is empty")
    elif len(cells) > len(header):
        rec.error = ("malformed_row", f"{len(cells)} cells for {len(header)} columns")
    elif inside is not None and not inside(rec.resolved):
        rec.error = ("outside_manifest", "the path leaves the manifest's folder (use --allow-outside)")
    return rec


class Containment:
    """Whether a manifest path stays under the manifest's folder once ``..`` and symlinks are resolved.

    Why not ``Path.resolve()`` per row: it ``lstat``s every component of every path, a quarter of
    ingesting a million rows, while a shop's manifest names a few folders many times. A path's real
    location is its folder's real location (cached) joined with its name, resolved further only when
    that name is itself a symlink, which is exactly what ``realpath`` computes.
    """

    def __init__(self, base: Path) -> None:
        self.real_base = os.path.realpath(base)
        self._folders: dict[str, str] = {}

    def __call__(self, path: Path) -> bool:
        head, name = os.path.split(os.fspath(path))
        if name in ("", ".", ".."):
            real = os.path.realpath(path)
        else:
            folder = self._folders.get(head)
            if folder is None:
                folder = self._folders[head] = os.path.realpath(head or ".")
            real = os.path.join(folder, name)
            if os.path.islink(real):
                real = os.path.realpath(real)
        return real == self.real_base or real.startswith(self.real_base.rstrip(os.sep) + os.sep)
