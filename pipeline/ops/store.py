"""The history store: every night's rows, committed in chunks, published atomically.

Layout of ``--store DIR``::

    DIR/labels/run_date=2026-11-22/<run id>/part-000000.parquet   the dataset (hive-partitioned by run_date)
    DIR/index/<run id>/part-000000.parquet                          hashes + labels of kept photos
    DIR/staging/                                                       tonight's run until it is published
    DIR/staging/attempts/<attempt>/                                    parts a Ray worker wrote, not yet committed
    DIR/lock                                                           held (flock) while a run works

Why this shape. Readers (pandas, pyarrow, DuckDB, Spark) read ``DIR/labels``
as a partitioned Parquet dataset and must never see half a night: tonight's
chunks are committed one file at a time into ``staging/`` (invisible to
them) and appear in ``labels/`` by one directory rename at the end. A run
killed at any moment (SIGKILL, reboot) leaves committed chunks in
``staging/``; the next run over the same input (same fingerprint, model
version and chunk size) reuses its run id, skips those chunks and finishes
the job, so no row is lost or written twice. A run over different input
discards the stale staging first. Where workers write the parts (the Ray
runner), each writes into its driver's own ``staging/attempts/<attempt>/``
and the driver commits a chunk by moving its parts into ``staging/`` (the
output-committer pattern of Hadoop and Spark): a worker that outlives its
killed driver can only write into an attempt folder no run ever commits
from, which the next run sweeps. The publish step itself is recorded
(``state: publishing``) and completed by the next run if it was interrupted.

``DIR`` may be a local or NFS folder or a URI of any filesystem ``pyarrow.fs``
reads (``s3://``, ``gs://``, ``hdfs://``): every read and write goes through
it (``Store``). On a local or NFS folder the lock is an ``flock`` on
``DIR/lock``: the kernel releases it when the holder dies, however it dies,
so a stale lock cannot outlive its process, and Linux NFS clients forward it
to the server's lock manager, so it holds between hosts; the file records who
holds it for the "locked" message. An object store has no lock a process can
take: the Ray runner holds one in its cluster (``runners/ray.py``,
``cluster_lock``), and the local runner refuses such a store.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.contract import BY_NAME, LABEL_FIELDS
from pipeline.ops.fsutil import atomic_path

#: Index fields that only the store keeps (dedupe state), beside the contract's indexed and label fields.
STORE_ONLY = {"in_dedupe": pa.bool_(), "rotated": pa.list_(pa.string()), "color": pa.list_(pa.float32()),
              "file": pa.string(),  # an error row's file identity: path, size, mtime (parts of older versions: null)
              # a classified photo's embedding (``quantise``); null in parts written before it was kept
              "embedding_q8": pa.list_(pa.int8()), "embedding_scale": pa.float32(),
              # the whole photo's pHash per view and its 32x32 RGB thumbnail (``Hashes``); null in older parts
              "phash_whole": pa.list_(pa.string()), "thumb": pa.binary(),
              "phash_inner": pa.string()}  # the photo's centre pHash (``Hashes.inner``); null in older parts
#: Field order of index parts written by earlier versions; new fields go at the end.
INDEX_ORDER = ("run_id", "row", "sha256", "in_dedupe", "phash", "phash256", "rotated", "color", "status", "label",
               "confidence", "topk_labels", "topk_scores", "label_source", "junk_reason", "model_version",
               "product_evidence", "imagenet_top", "error", "error_detail", "file", "category_hint",
               "embedding_q8", "embedding_scale", "phash_whole", "thumb", "phash_inner")
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
ATTEMPTS = "attempts"  # staging/attempts/<attempt>/: parts written by workers, until their driver commits them


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


def read_index(part: str | Path, filesystem: pafs.FileSystem | None = None) -> list[dict[str, Any]]:
    """An index part's records; ``embedding_q8`` as an int8 array (one Python int per dimension would
    cost 30x the memory of the codes for a long history)."""
    table = pq.read_table(part, schema=INDEX_SCHEMA, filesystem=filesystem)
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
    """A history store at a local path, a URI (``s3://bucket/labelcat``, ``gs://...``, ``hdfs://...``,
    ``file:///...``) or a path on a ``pyarrow.fs`` filesystem the caller configured (credentials, endpoint).

    Every read and write goes through ``pyarrow.fs``. What differs by
    filesystem is only what it can promise: a local (or NFS) folder is locked
    by ``flock`` and published by one directory rename; an object store has
    neither, so it needs a lock held elsewhere (``lock(cluster=...)``: the Ray
    runner's cluster lock) and publishes file by file (``_move_tree``).
    """

    def __init__(self, root: str | Path, filesystem: pafs.FileSystem | None = None) -> None:
        if filesystem is not None:
            self.fs, base = filesystem, str(root)
        elif isinstance(root, str) and "://" in root:
            try:
                self.fs, base = pafs.FileSystem.from_uri(root)
            except (pa.ArrowInvalid, OSError) as exc:
                raise StoreError(f"--store {root}: {exc}") from None
        else:
            self.fs, base = pafs.LocalFileSystem(), str(Path(root).absolute())
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.root = base.rstrip("/") or ("/" if self.local else "")
        if not self.root:
            raise StoreError(f"--store {root} names no folder in its filesystem")
        self.location = str(root) if filesystem is None or self.local else f"{self.fs.type_name}:{self.root}"
        self.labels = f"{self.root}/labels"
        self.index = f"{self.root}/index"
        self.staging = f"{self.root}/staging"

    # -- filesystem primitives ---------------------------------------------------

    def _type(self, path: str) -> pafs.FileType:
        return self.fs.get_file_info(path).type

    def _listing(self, folder: str, recursive: bool = False) -> list[pafs.FileInfo]:
        """What ``folder`` holds (nothing if it does not exist), sorted by path."""
        selector = pafs.FileSelector(folder, allow_not_found=True, recursive=recursive)
        return sorted(self.fs.get_file_info(selector), key=lambda info: info.path)

    def _parts(self, folder: str, pattern: str = "part-*.parquet") -> list[str]:
        return [i.path for i in self._listing(folder) if i.type == pafs.FileType.File and fnmatch(i.base_name, pattern)]

    def _read_text(self, path: str) -> str | None:
        if self._type(path) != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as f:
            return f.read().decode()

    def _write(self, path: str, write: Callable[[str], None]) -> None:
        """``write(tmp)`` writes the file through ``self.fs``; the result replaces ``path`` in one step.

        Local: ``atomic_path`` (fsync, rename, temporaries of dead writers swept).
        Elsewhere: a dot-named temporary beside it, then ``move``: a rename
        where the filesystem has one, a single-object copy on object stores,
        whose objects appear whole or not at all.
        """
        if self.local:
            with atomic_path(path, suffix=Path(path).suffix) as tmp:
                write(str(tmp))
            return
        folder, name = path.rsplit("/", 1)
        self.fs.create_dir(folder, recursive=True)
        tmp = f"{folder}/.{name}.{uuid.uuid4().hex}.tmp"
        try:
            write(tmp)
            self.fs.move(tmp, path)
        except BaseException:  # only then is there a temporary left: no extra request per write on object stores
            if self._type(tmp) != pafs.FileType.NotFound:
                self.fs.delete_file(tmp)
            raise

    def _write_text(self, path: str, text: str) -> None:
        def write(tmp: str) -> None:
            with self.fs.open_output_stream(tmp) as f:
                f.write(text.encode())
        self._write(path, write)

    def _move_tree(self, src: str, dst: str) -> None:
        """Move folder ``src`` to ``dst``: one rename where the filesystem can (local, NFS, HDFS), else
        file by file (object stores have no folders to rename). Safe to repeat after a kill: files moved
        already are gone from ``src`` and a file moved twice is the same file."""
        if self._type(src) == pafs.FileType.NotFound:
            return
        if self._type(dst) == pafs.FileType.NotFound:
            self.fs.create_dir(dst.rsplit("/", 1)[0], recursive=True)
            try:
                self.fs.move(src, dst)
                return
            except (OSError, NotImplementedError):
                if self.local:
                    raise
        for info in self._listing(src, recursive=True):
            if info.type == pafs.FileType.File and not info.base_name.startswith("."):
                target = dst + info.path[len(src):]
                self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
                self.fs.move(info.path, target)
        self.fs.delete_dir(src)

    # -- claiming and locking ------------------------------------------------------

    def claim(self) -> None:
        """Make sure the folder is a labelcat store (or empty, or new) before anything is written in it.

        labelcat never deletes or overwrites what it did not create: a folder
        with other files in it, or a ``staging`` folder without labelcat's run
        state, is refused with ``StoreError``. An earlier version's store (only
        known entries, no marker) gets the marker.
        """
        kind = self._type(self.root)
        if kind == pafs.FileType.File:
            raise StoreError(f"--store {self.location} is not a folder")
        entries = {i.base_name for i in self._listing(self.root)} if kind == pafs.FileType.Directory else set()
        foreign = sorted(entries - STORE_ENTRIES)
        if foreign:
            raise StoreError(f"--store {self.location} holds files labelcat did not create ({', '.join(foreign[:5])}); "
                             "use an empty or new folder")
        if "staging" in entries and self._type(self._state_file()) != pafs.FileType.File and not self._only_attempts():
            raise StoreError(f"{self.staging} exists but is not labelcat's staging (no run.json); move it away")
        self.fs.create_dir(self.root, recursive=True)
        if MARKER not in entries:
            self._write_text(f"{self.root}/{MARKER}", "")

    def _only_attempts(self) -> bool:
        """Whether ``staging`` holds nothing but attempt folders of labelcat's parts: what a worker of a killed
        Ray driver can leave after the re-run published (``open_staging`` sweeps it under the lock)."""
        listing = self._listing(self.staging, recursive=True)
        return bool(listing) and all(i.path.startswith(f"{self.staging}/{ATTEMPTS}") and (
            i.type == pafs.FileType.Directory or fnmatch(i.base_name, "part-*.*") or i.base_name.startswith("."))
            for i in listing)

    def check(self, cluster: bool = False) -> None:
        """Refuse, before any work, a store that is foreign (``StoreError``), locked (``StoreLocked``) or
        that no lock can guard: a store off the local filesystem needs the cluster's lock (``cluster``)."""
        with self.lock(cluster=(lambda key: contextlib.nullcontext()) if cluster else None):
            pass

    @contextlib.contextmanager
    def lock(self, cluster: Callable[[str], contextlib.AbstractContextManager] | None = None) -> Iterator[None]:
        """Hold the store's lock for the whole run; ``StoreLocked`` if another run has it.

        A local or NFS folder: ``flock`` on ``DIR/lock`` (on Linux NFS mounts,
        with the default ``local_lock=none``, the client forwards it to the
        server's lock manager, so it holds across hosts). ``cluster(key)``, when
        given, is held as well: the Ray runner's lock, a named actor in the
        cluster, which holds across the cluster's hosts on any filesystem. An
        object store without a cluster lock is refused: nothing in it can be
        locked.
        """
        self.claim()
        if not self.local and cluster is None:
            raise StoreError(f"--store {self.location} is on {self.fs.type_name}, where labelcat cannot take a lock "
                             "from one process; run it with --runner ray, whose cluster holds the lock")
        with contextlib.ExitStack() as stack:
            if self.local:
                stack.enter_context(self._flock())
            if cluster is not None:
                stack.enter_context(cluster(f"{self.fs.type_name}:{self.root}"))
            yield

    @contextlib.contextmanager
    def _flock(self) -> Iterator[None]:
        """The lock file is opened without following symlinks, so a link planted
        as ``DIR/lock`` cannot make labelcat overwrite its target."""
        path = f"{self.root}/lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot use {path} as the store's lock: {exc.strerror or exc}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
                raise StoreLocked(f"store {self.location} is locked by {holder}") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder_info().encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the flock

    def load_history(self, only_version: str | None = None) -> History:
        """Index records of every published run, under negative keys.

        ``only_version`` (``--relabel``): photos another model version labelled
        are left out, so they are classified again rather than seen or matched.
        """
        history = History()
        runs = [i.path for i in self._listing(self.index) if i.type == pafs.FileType.Directory]
        for part in (p for run in runs for p in self._parts(run)):
            for rec in read_index(part, self.fs):
                if only_version is None or rec["model_version"] == only_version:
                    history.add(rec)
        return history

    # -- staging ---------------------------------------------------------------

    def _state_file(self) -> str:
        return f"{self.staging}/run.json"

    def _part(self, kind: str, n: int, ext: str = "parquet", attempt: str | None = None) -> str:
        folder = self.staging if attempt is None else f"{self.staging}/{ATTEMPTS}/{attempt}"
        return f"{folder}/{kind}/part-{n:06d}.{ext}"

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
        if self._type(f"{self.staging}/{ATTEMPTS}") != pafs.FileType.NotFound:  # killed drivers' workers' parts
            try:
                self.fs.delete_dir(f"{self.staging}/{ATTEMPTS}")
            except OSError as exc:  # a killed driver's worker still writing: its parts are never committed
                log(f"could not sweep {self.staging}/{ATTEMPTS}: {exc}")
        if state and state.get("state") == "publishing":
            log(f"completing the interrupted publish of run {state['run_id']}")
            self._publish(state)
            if same:
                return state["run_id"], state["run_date"], None
            state = None
        if state and same:
            done = {int(p.rsplit("/", 1)[1].split("-")[1].split(".")[0]) for p in self._parts(f"{self.staging}/labels")}
            changed = self.files_unchanged(done)
            if changed is None:
                log(f"resuming run {state['run_id']}: {len(done)} chunks already committed")
                return state["run_id"], state["run_date"], done
            log(f"not resuming run {state['run_id']}: {changed} changed since it was read")
        elif state:
            log(f"discarding unfinished run {state['run_id']} (its input or model differ)")
        if self._type(self.staging) != pafs.FileType.NotFound:
            self.fs.delete_dir(self.staging)
        for kind in ("labels", "index"):
            self.fs.create_dir(f"{self.staging}/{kind}", recursive=True)
        self._write_state({"run_id": new_run_id, "run_date": run_date, "fingerprint": fingerprint,
                           "model_version": model_version, "chunk_size": chunk_size, "state": "running"})
        return new_run_id, run_date, set()

    def _read_state(self) -> dict[str, Any] | None:
        try:
            return json.loads(self._read_text(self._state_file()) or "null")
        except json.JSONDecodeError:
            return None

    def _write_state(self, state: dict[str, Any]) -> None:
        self._write_text(self._state_file(), json.dumps(state))

    def commit_chunk(self, n: int, rows: pa.Table, index_records: list[dict[str, Any]],
                     files: list[tuple[str, int, int]] | None = None, attempt: str | None = None) -> None:
        """Files record, index part, then the rows part: a chunk counts as done once its rows part exists.

        ``files`` (path, size, mtime_ns) are what the chunk read; a resume
        checks them, so a photo replaced under the same name is not taken from
        a committed chunk (``files_unchanged``). With ``attempt`` (a worker
        writing for its driver) the parts go into that attempt's folder and
        count for nothing until the driver's ``promote_chunk``.
        """
        self._write_text(self._part("files", n, "json", attempt), json.dumps(files or []))
        index = pa.Table.from_pylist(index_records, schema=INDEX_SCHEMA)
        self._write(self._part("index", n, attempt=attempt), lambda tmp: pq.write_table(index, tmp, filesystem=self.fs))
        self._write(self._part("labels", n, attempt=attempt), lambda tmp: pq.write_table(rows, tmp, filesystem=self.fs))

    def promote_chunk(self, n: int, attempt: str) -> None:
        """Commit chunk ``n`` that a worker wrote into ``attempt``'s folder: its parts move into ``staging``,
        the rows part last, each in one step (a rename; on an object store, one object's copy)."""
        for kind, ext in (("files", "json"), ("index", "parquet"), ("labels", "parquet")):
            self.fs.create_dir(f"{self.staging}/{kind}", recursive=True)
            self.fs.move(self._part(kind, n, ext, attempt), self._part(kind, n, ext))

    def files_unchanged(self, chunks: set[int]) -> str | None:
        """None if every file the committed ``chunks`` read still has its size and modification time;
        else the first path that changed (the resume must start afresh)."""
        for n in sorted(chunks):
            try:
                files = json.loads(self._read_text(self._part("files", n, "json")) or "")
            except json.JSONDecodeError:
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
        rows = pq.read_table(self._part("labels", n), filesystem=self.fs)
        return rows, read_index(self._part("index", n), self.fs)

    def published_parts(self, run_date: str, run_id: str) -> list[str]:
        return self._parts(f"{self.labels}/run_date={run_date}/{run_id}")

    def read_published(self, part: str) -> pa.Table:
        return pq.read_table(part, filesystem=self.fs)

    def publish(self) -> str:
        """Make tonight's run visible: rename the staged folders into the dataset."""
        state = self._read_state()
        state["state"] = "publishing"
        self._write_state(state)
        return self._publish(state)

    def _publish(self, state: dict[str, Any]) -> str:
        # The run folder has no "key=" so readers do not add a second run_id column.
        target = f"{self.labels}/run_date={state['run_date']}/{state['run_id']}"
        self._move_tree(f"{self.staging}/index", f"{self.index}/{state['run_id']}")
        fault_point("mid-publish")
        self._move_tree(f"{self.staging}/labels", target)
        if self._type(self.staging) != pafs.FileType.NotFound:
            self.fs.delete_dir(self.staging)
        return target


def holder_info() -> str:
    """Who holds a lock, for the "locked" message."""
    return f"pid {os.getpid()} on {socket.gethostname()} since {datetime.now(timezone.utc):%Y-%m-%dT%H:%M:%SZ}"
