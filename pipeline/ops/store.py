"""The history store: every night's rows, committed in chunks, published atomically.

Layout of ``--store DIR``::

    DIR/labels/run_date=2026-11-22/<run id>/part-000000.parquet   the dataset (hive-partitioned by run_date)
    DIR/index/<run id>/part-000000.parquet                          hashes + labels of kept photos
    DIR/staging/                                                       tonight's run until it is published
    DIR/lock                                                           held (flock) while a run works

Why this shape. Readers (pandas, pyarrow, DuckDB, Spark) read ``DIR/labels``
as a partitioned Parquet dataset and must never see half a night: tonight's
chunks are committed one file at a time into ``staging/`` (invisible to
them) and appear in ``labels/`` by one directory rename at the end. A run
killed at any moment (SIGKILL, reboot) leaves committed chunks in
``staging/``; the next run over the same input (same fingerprint, model
version and chunk size) reuses its run id, skips those chunks and finishes
the job, so no row is lost or written twice. A run over different input
discards the stale staging first. The publish step itself is recorded
(``state: publishing``) and completed by the next run if it was interrupted.

The lock is an ``flock`` on ``DIR/lock``: the kernel releases it when the
holder dies, however it dies, so a stale lock cannot outlive its process;
the file records who holds it for the "locked" message. (flock is local to
one machine: do not share a store over NFS between hosts.)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.contract import BY_NAME, LABEL_FIELDS
from pipeline.ops.fsutil import atomic_path

#: Index fields that only the store keeps (dedupe state), beside the contract's indexed and label fields.
STORE_ONLY = {"in_dedupe": pa.bool_(), "rotated": pa.list_(pa.string()), "color": pa.list_(pa.float32()),
              "file": pa.string(),  # an error row's file identity: path, size, mtime (parts of older versions: null)
              # a classified photo's embedding (``quantise``); null in parts written before it was kept
              "embedding_q8": pa.list_(pa.int8()), "embedding_scale": pa.float32(),
              # the whole photo's pHash per view and its 32x32 RGB thumbnail (``Hashes``); null in older parts
              "phash_whole": pa.list_(pa.string()), "thumb": pa.binary()}
#: Field order of index parts written by earlier versions; new fields go at the end.
INDEX_ORDER = ("run_id", "row", "sha256", "in_dedupe", "phash", "phash256", "rotated", "color", "status", "label",
               "confidence", "topk_labels", "topk_scores", "label_source", "junk_reason", "model_version",
               "product_evidence", "imagenet_top", "error", "error_detail", "file", "category_hint",
               "embedding_q8", "embedding_scale", "phash_whole", "thumb")
INDEX_SCHEMA = pa.schema([(n, STORE_ONLY[n] if n in STORE_ONLY else BY_NAME[n].type) for n in INDEX_ORDER])


FAULT_ENV = "LABELCAT_FAULT"


def fault_point(name: str) -> None:
    """Crash-test hook: ``LABELCAT_FAULT=kill@NAME`` SIGKILLs this process here,
    ``pause@NAME`` sleeps (holding the lock) so a test can race or kill it.

    Points: ``after-chunk:N`` (chunk N committed), ``before-publish`` (--out written, nothing published)
    and ``mid-publish`` (index
    published, labels not yet). Unset in production; the tests use it to prove
    that a killed run resumes to the same store.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec or "@" not in spec:
        return
    action, point = spec.split("@", 1)
    if point != name:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "pause":
        time.sleep(float(os.environ.get("LABELCAT_FAULT_PAUSE", "60")))


class StoreLocked(RuntimeError):
    """Another run holds the store's lock."""


class StoreError(ValueError):
    """The store folder is not labelcat's to write (foreign content, a symlinked lock): a usage error."""


MARKER = ".labelcat-store"
#: What a store folder may hold; anything else means the folder is someone else's.
STORE_ENTRIES = frozenset({MARKER, "lock", "labels", "index", "staging"})


def index_record(run_id: str, row: dict[str, Any], hash_fields: dict[str, Any], in_dedupe: bool,
                 model_version: str, file: str | None = None) -> dict[str, Any]:
    """What the store remembers of a photo: its hashes (as ``Hashes.to_fields`` gives them, for photos that
    could be read), its status, label and hint, its embedding when it was classified (``row["embedding"]``,
    float), and for unusable files their identity (``file``) and error."""
    embedding = row.get("embedding")
    codes, scale = quantise(np.asarray(embedding)[None, :]) if embedding is not None else (None, None)
    return {
        "category_hint": row.get("category_hint"),
        "embedding_q8": codes[0] if codes is not None else None,
        "embedding_scale": float(scale[0]) if scale is not None else None,
        "run_id": run_id, "row": row["row"], "sha256": row.get("sha256"), "in_dedupe": in_dedupe,
        **hash_fields, "status": row["status"], "error": row.get("error"), "error_detail": row.get("error_detail"),
        "file": file,
        "model_version": model_version, "junk_reason": row.get("junk_reason"),
        **{k: row.get(k) for k in LABEL_FIELDS},
    }


def quantise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of float features → (int8 codes, one float32 scale per row): a quarter of float32's size.

    Why per-row symmetric scales: what later nights compute on stored
    embeddings (cosine similarity, means of unit vectors) needs each row's
    direction, which 8 bits per dimension keep to about 0.9999 cosine.
    """
    x = np.asarray(x, np.float32)
    scale = np.abs(x).max(axis=1) / 127.0 if x.size else np.zeros(len(x), np.float32)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return np.clip(np.rint(x / scale[:, None]), -127, 127).astype(np.int8), scale


def dequantise(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Inverse of ``quantise`` (to its rounding)."""
    return np.asarray(codes, np.float32) * np.asarray(scale, np.float32)[..., None]


def read_index(part: Path) -> list[dict[str, Any]]:
    """An index part's records; ``embedding_q8`` as an int8 array (one Python int per dimension would
    cost 30x the memory of the codes for a long history)."""
    table = pq.read_table(part, schema=INDEX_SCHEMA)
    codes = table.column("embedding_q8").combine_chunks()
    records = table.drop_columns(["embedding_q8"]).to_pylist()
    if codes.null_count == len(codes):
        return [{**rec, "embedding_q8": None} for rec in records]
    flat = pc.list_flatten(codes).to_numpy(zero_copy_only=False)
    offsets = codes.offsets.to_numpy()
    valid = codes.is_valid().to_numpy(zero_copy_only=False)
    for i, rec in enumerate(records):
        rec["embedding_q8"] = flat[offsets[i] - offsets[0]:offsets[i + 1] - offsets[0]] if valid[i] else None
    return records


@dataclass
class History:
    """Photos kept on earlier nights (and in this run's committed chunks), by dedupe key."""

    entries: dict[int, dict[str, Any]] = field(default_factory=dict)  # key -> index record
    by_sha: dict[str, int] = field(default_factory=dict)
    by_file: dict[str, int] = field(default_factory=dict)  # unusable files, by path, size and mtime
    by_ref: dict[tuple[str, int], int] = field(default_factory=dict)  # (run id, row) -> key
    next_key: int = -1  # earlier nights get negative keys; this run's rows are >= 0

    def add(self, rec: dict[str, Any], key: int | None = None) -> int:
        """Remember one index record; the caller adds ``in_dedupe`` records to its match index under the key."""
        if key is None:
            key, self.next_key = self.next_key, self.next_key - 1
        self.entries[key] = rec
        if rec.get("sha256"):
            self.by_sha.setdefault(rec["sha256"], key)
        if rec.get("file"):
            self.by_file.setdefault(rec["file"], key)
        self.by_ref[(rec["run_id"], rec["row"])] = key
        return key


class Store:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.labels = self.root / "labels"
        self.index = self.root / "index"
        self.staging = self.root / "staging"

    def claim(self) -> None:
        """Make sure the folder is a labelcat store (or empty, or new) before anything is written in it.

        labelcat never deletes or overwrites what it did not create: a folder
        with other files in it, or a ``staging`` folder without labelcat's run
        state, is refused with ``StoreError``. An earlier version's store (only
        known entries, no marker) gets the marker.
        """
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"--store {self.root} is not a folder")
        entries = {p.name for p in self.root.iterdir()} if self.root.is_dir() else set()
        foreign = sorted(entries - STORE_ENTRIES)
        if foreign:
            raise StoreError(f"--store {self.root} holds files labelcat did not create ({', '.join(foreign[:5])}); "
                             "use an empty or new folder")
        if self.staging.exists() and not (self.staging / "run.json").is_file():
            raise StoreError(f"{self.staging} exists but is not labelcat's staging (no run.json); move it away")
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / MARKER).touch()

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the store's lock for the whole run; ``StoreLocked`` if another run has it.

        The lock file is opened without following symlinks, so a link planted
        as ``DIR/lock`` cannot make labelcat overwrite its target.
        """
        self.claim()
        try:
            fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot use {self.root / 'lock'} as the store's lock: {exc.strerror or exc}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
                raise StoreLocked(f"store {self.root} is locked by {holder}") from None
            info = f"pid {os.getpid()} on {socket.gethostname()} since {datetime.now(timezone.utc):%Y-%m-%dT%H:%M:%SZ}"
            os.ftruncate(fd, 0)
            os.pwrite(fd, info.encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the flock

    def load_history(self, only_version: str | None = None) -> History:
        """Index records of every published run, under negative keys.

        ``only_version`` (``--relabel``): photos another model version labelled
        are left out, so they are classified again rather than seen or matched.
        """
        history = History()
        for part in sorted(self.index.glob("*/part-*.parquet")):
            for rec in read_index(part):
                if only_version is None or rec["model_version"] == only_version:
                    history.add(rec)
        return history

    # -- staging ---------------------------------------------------------------

    def _state_file(self) -> Path:
        return self.staging / "run.json"

    def open_staging(self, fingerprint: str, model_version: str, chunk_size: int, new_run_id: str,
                     run_date: str, log) -> tuple[str, str, set[int] | None]:
        """(run id, run date, committed chunks): resume a matching unfinished run, else start afresh.

        Committed chunks are ``None`` when a run over this same input had done
        all its work and was killed while publishing: the publish is completed
        and there is nothing left to do.
        """
        state = self._read_state()
        same = state is not None and (state["fingerprint"], state["model_version"], state["chunk_size"]) == (
            fingerprint, model_version, chunk_size)
        if state and state.get("state") == "publishing":
            log(f"completing the interrupted publish of run {state['run_id']}")
            self._publish(state)
            if same:
                return state["run_id"], state["run_date"], None
            state = None
        if state and same:
            done = {int(p.stem.split("-")[1]) for p in (self.staging / "labels").glob("part-*.parquet")}
            changed = self.files_unchanged(done)
            if changed is None:
                log(f"resuming run {state['run_id']}: {len(done)} chunks already committed")
                return state["run_id"], state["run_date"], done
            log(f"not resuming run {state['run_id']}: {changed} changed since it was read")
        elif state:
            log(f"discarding unfinished run {state['run_id']} (its input or model differ)")
        shutil.rmtree(self.staging, ignore_errors=True)
        (self.staging / "labels").mkdir(parents=True)
        (self.staging / "index").mkdir(parents=True)
        self._write_state({"run_id": new_run_id, "run_date": run_date, "fingerprint": fingerprint,
                           "model_version": model_version, "chunk_size": chunk_size, "state": "running"})
        return new_run_id, run_date, set()

    def _read_state(self) -> dict[str, Any] | None:
        try:
            return json.loads(self._state_file().read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _write_state(self, state: dict[str, Any]) -> None:
        with atomic_path(self._state_file(), suffix=".json") as tmp:
            tmp.write_text(json.dumps(state))

    def commit_chunk(self, n: int, rows: pa.Table, index_records: list[dict[str, Any]],
                     files: list[tuple[str, int, int]] | None = None) -> None:
        """Files record, index part, then the rows part: a chunk counts as done once its rows part exists.

        ``files`` (path, size, mtime_ns) are what the chunk read; a resume
        checks them, so a photo replaced under the same name is not taken from
        a committed chunk (``files_unchanged``).
        """
        with atomic_path(self.staging / "files" / f"part-{n:06d}.json", suffix=".json") as tmp:
            tmp.write_text(json.dumps(files or []))
        with atomic_path(self.staging / "index" / f"part-{n:06d}.parquet", suffix=".parquet") as tmp:
            pq.write_table(pa.Table.from_pylist(index_records, schema=INDEX_SCHEMA), tmp)
        with atomic_path(self.staging / "labels" / f"part-{n:06d}.parquet", suffix=".parquet") as tmp:
            pq.write_table(rows, tmp)

    def files_unchanged(self, chunks: set[int]) -> str | None:
        """None if every file the committed ``chunks`` read still has its size and modification time;
        else the first path that changed (the resume must start afresh)."""
        for n in sorted(chunks):
            try:
                files = json.loads((self.staging / "files" / f"part-{n:06d}.json").read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                return f"chunk {n}'s file list"
            for path, size, mtime_ns in files:
                try:
                    st = os.stat(path)
                    now = (st.st_size, st.st_mtime_ns)
                except OSError:
                    now = (-1, -1)
                if now != (size, mtime_ns):
                    return path
        return None

    def read_chunk(self, n: int) -> tuple[pa.Table, list[dict[str, Any]]]:
        rows = pq.read_table(self.staging / "labels" / f"part-{n:06d}.parquet")
        return rows, read_index(self.staging / "index" / f"part-{n:06d}.parquet")

    def published_parts(self, run_date: str, run_id: str) -> list[Path]:
        return sorted((self.labels / f"run_date={run_date}" / run_id).glob("part-*.parquet"))

    def publish(self) -> Path:
        """Make tonight's run visible: rename the staged folders into the dataset."""
        state = self._read_state()
        state["state"] = "publishing"
        self._write_state(state)
        return self._publish(state)

    def _publish(self, state: dict[str, Any]) -> Path:
        # The run folder has no "key=" so readers do not add a second run_id column.
        target = self.labels / f"run_date={state['run_date']}" / state["run_id"]
        index_target = self.index / state["run_id"]
        if (self.staging / "index").exists() and not index_target.exists():
            index_target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.staging / "index", index_target)
        fault_point("mid-publish")
        if (self.staging / "labels").exists() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.staging / "labels", target)
        shutil.rmtree(self.staging, ignore_errors=True)
        return target
