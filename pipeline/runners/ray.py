"""``--runner ray``: the same stages as Ray Data operations, for more than one machine.

Why this shape: nothing here re-implements a stage. Ray Data only decides
*where* the stage functions run: the input is one Ray dataset for the whole
run, read by ``ingest`` itself in one light task on the driver's node
(``IngestDatasource``) and scanned (read, sha256, decode, hashes, quality) by
``map_batches`` over stateless tasks as it streams, the driver taking one
chunk's records and scans at a time; classification runs on
plain actors started once per run, so each actor loads the model once and runs
the same ``tf.data`` loop (``stages.classify.predict``) on its batches, with a GPU per
actor when the cluster has them; assembling rows, junk rules and the Parquet
writer are the local runner's. Near duplicates: the kept photos' hashes go
into the object store as flat arrays once per segment, an actor pool keeps
their bucket tables and searches ranges of each chunk's photos against all of
them (``nearpairs.PairSearch``, multi-index hashing, never all pairs) and
returns only the verified pairs; the driver's kept-first walk over those pairs
is ``find_duplicates`` itself (README, "Runners"). With ``--store``, workers
encode and write each chunk's Parquet parts into the driver's own attempt
folder while the driver decides the next chunks; the driver commits a chunk by
moving its parts into staging (``Store.promote_chunk``).

The night is the local runner's loop (``run``) with this module's
``Engine``: chunks (the driver holds one at a time; Ray Data's backpressure
bounds how far the scans run ahead, in the object store), with ``--store`` the
store's index for photos seen and kept on earlier nights, commits into
staging, the lock, resume and publish are the same code, so both runners make
the same decisions by construction. The store's lock is also held in the cluster (``cluster_lock``): a named actor,
safe across the cluster's hosts on any filesystem, object stores included.

Known traps on small machines (seen with Ray 2.60 on 2 cores): an actor pool
that takes every CPU starves the read tasks and hangs silently, so the pool
and each actor's ``num_cpus`` are sized from the cluster's CPUs; ``ray.init``
costs a few seconds, so the local runner stays the default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.models.classifier import Classifier, load_classifier, resolve_model
from pipeline.ops.store import INDEX_SCHEMA, Store, StoreLocked, holder_info
from pipeline.runners.local import Engine, RunConfig, chunked, run
from pipeline.stages.ingest import Record, ingest
from pipeline.stages.classify import Predictions, predict
from pipeline.stages.dedupe import DedupeConfig, Hashes
from pipeline.stages.junk import Quality
from pipeline.stages.nearpairs import HashArrays, PairSearch
from pipeline.stages.scan import Scan, scan_one

SCAN_BATCH = 16  # the fewest photos a scan task takes
# chunks the driver decides while earlier ones are being written: with one, a driver with nothing to classify
# (100,000 rows of missing files) waited 39 ms a chunk for its writer, competing with the scans for the CPUs;
# with four, 17 ms (the driver's own writes had cost 43 ms)
COMMITS_AHEAD = 4
HASH_FIELDS = ("phash", "phash256", "rotated", "color", "phash_whole", "thumb", "phash_inner")  # ``Hashes.to_fields``


def scan_batch_size(photos: int, cpus: float) -> int:
    """Photos per scan task: about four tasks per CPU of the cluster for a chunk, at least ``SCAN_BATCH``.

    Why not a fixed 16: a task costs Ray tens of milliseconds to schedule, as much as scanning a few
    photos, so a 2,048-row chunk of missing files took 3 s in 128 tasks on 2 CPUs (a million-row night
    on Ray spent most of its 40 minutes there); four tasks per CPU still spread the work evenly.
    """
    return max(SCAN_BATCH, -(-photos // max(1, int(4 * cpus))))


RECORD_SCHEMA = pa.schema([("row", pa.int64()), ("path", pa.string()), ("resolved", pa.binary()),
                           ("absolute", pa.binary()), ("sku", pa.string()), ("category_hint", pa.string()),
                           ("extra", pa.string()), ("pre_error", pa.string()), ("wanted", pa.bool_())])
SCAN_SCHEMA = pa.schema([("ok", pa.bool_()), ("error", pa.string()), ("error_detail", pa.string()),
                         ("sha256", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
                         ("fidelity", pa.int64()), ("pixel_std", pa.float64()), ("aspect_ratio", pa.float64()),
                         # the hashes travel as the store's index keeps them
                         *(INDEX_SCHEMA.field(name) for name in HASH_FIELDS)])  # ``Scan``, or the scan's error


def record_columns(records: list[Record], wanted: bool) -> pa.Table:
    """A chunk's ingest records as a block of the input dataset; ``absolute``: where any node of the
    cluster reads the file (the records keep the path as the local runner resolves it)."""
    return pa.table({"row": [r.row for r in records], "path": [r.path for r in records],
                     "resolved": [os.fsencode(r.resolved) for r in records],
                     "absolute": [os.fsencode(os.path.abspath(r.resolved)) for r in records],
                     "sku": [r.sku for r in records], "category_hint": [r.category_hint for r in records],
                     "extra": [json.dumps(r.extra) for r in records],
                     "pre_error": ["\t".join(r.error) if r.error else "" for r in records],
                     "wanted": [wanted] * len(records)}, schema=RECORD_SCHEMA)


def records_from_columns(batch: dict[str, list[Any]]) -> list[Record]:
    """Inverse of ``record_columns``: the records the local runner's ingest gives for these rows."""
    return [Record(row, path, Path(os.fsdecode(resolved)), sku, hint, json.loads(extra),
                   tuple(pre.split("\t", 1)) if pre else None)  # type: ignore[arg-type]
            for row, path, resolved, sku, hint, extra, pre in zip(
                batch["row"], batch["path"], batch["resolved"], batch["sku"], batch["category_hint"], batch["extra"],
                batch["pre_error"])]


class IngestDatasource(Datasource):
    """The input (manifest or folder tree) as a Ray dataset: ``ingest`` itself, run by one read task on the
    driver's node, streaming its records in blocks of one chunk.

    Why not ``ray.data.read_csv``: pyarrow's CSV reader fails or skips a whole row on what ``ingest`` turns
    into that row's own error (bytes that are not UTF-8, a cell too long, a row with more cells than the
    header, a quoting error), infers types (an SKU ``00123`` would become 123) and knows nothing of
    folder trees; a night's promise is that every input row comes out with a status. The read task is
    sequential (so rows keep their numbers) and light (no file is opened but the manifest), so it
    reserves no CPU; it runs on the driver's node, in the driver's working folder, so relative paths
    resolve as the driver sees them.
    """

    def __init__(self, source: Path, cwd: str, allow_outside: bool, chunk_size: int,
                 wanted: Callable[[int], bool]) -> None:
        super().__init__()
        self.source, self.cwd, self.allow_outside, self.chunk_size, self.wanted = (
            source, cwd, allow_outside, chunk_size, wanted)

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        unknown = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)
        return [ReadTask(self._blocks, unknown)]

    def _blocks(self) -> Iterator[pa.Table]:
        here = os.getcwd()
        os.chdir(self.cwd)  # this worker runs only this task until it ends
        try:
            for n, records in enumerate(chunked(ingest(self.source, self.allow_outside).records, self.chunk_size)):
                yield record_columns(records, self.wanted(n))
        finally:
            os.chdir(here)


def _scan_batch(batch: pa.Table, max_pixels: int, max_bytes: int) -> pa.Table:
    """Ray task: ``scan_one`` (the scan every runner uses) on each photo of the batch that is wanted (not in
    a chunk committed before a kill), as ``SCAN_SCHEMA`` columns beside the records' columns."""
    out: dict[str, list[Any]] = {f.name: [] for f in SCAN_SCHEMA}
    for path, pre_error, wanted in zip(batch.column("absolute").to_pylist(), batch.column("pre_error").to_pylist(),
                                       batch.column("wanted").to_pylist()):
        known = tuple(pre_error.split("\t", 1)) if pre_error else None
        result = scan_one(Path(os.fsdecode(path)), max_pixels, max_bytes, known) if wanted \
            else ("skipped", "")  # type: ignore[arg-type]
        if isinstance(result, tuple):
            scanned: dict[str, Any] = {"ok": False, "error": result[0], "error_detail": result[1]}
        else:
            scanned = {"ok": True, "sha256": result.sha256, "width": result.width, "height": result.height,
                       "fidelity": result.fidelity, "pixel_std": result.quality.pixel_std, "aspect_ratio": result.quality.aspect_ratio,
                       **result.hashes.to_fields()}
        for name, column in out.items():
            column.append(scanned.get(name))
    for f in SCAN_SCHEMA:
        batch = batch.append_column(f, pa.array(out[f.name], f.type))
    return batch


class ChunkWriter:
    """Ray actor: encodes and writes each chunk's Parquet parts into its driver's attempt folder
    (``Store.commit_chunk``); the driver commits them (``Store.promote_chunk``).

    An actor, not a task per chunk: with a task per chunk, a million-row night's driver waited 2-4 s for
    a chunk's write several times over (53-61 s in all; with the actor, 7 s), which fits Ray reaping the
    idle worker of a task that takes no CPU and starting another (all its imports) for the next chunk.
    Not detached, so it dies with its driver.
    """

    def __init__(self, store: Store, attempt: str) -> None:
        self.store, self.attempt = store, attempt

    def write(self, n: int, rows: pa.Table, index_records: list[dict[str, Any]],
              files: list[tuple[str, int, int]]) -> str:
        """Write chunk ``n``'s parts; returns who wrote them."""
        self.store.commit_chunk(n, rows, index_records, files, self.attempt)
        return f"pid {os.getpid()} on {socket.gethostname()}"


class LockHolder:
    """Ray actor that is the store's lock while it lives: its name (one per store) is unique in the cluster.

    Why an actor: a store on an object store has no ``flock``, and a lock file
    there cannot be created atomically. Ray's GCS registers actor names
    atomically, and an actor that is not detached dies with the driver that
    created it, however the driver dies (SIGKILL included), so the lock is
    released exactly as an ``flock`` is.
    """

    def __init__(self, holder: str) -> None:
        self.holder = holder

    def who(self) -> str:
        return self.holder


LOCK_NAMESPACE = "labelcat"


@contextlib.contextmanager
def cluster_lock(key: str, wait_s: float = 30.0) -> Iterator[None]:
    """Hold the store ``key``'s lock in the connected Ray cluster; ``StoreLocked`` if a live run holds it.

    A holder whose driver was just killed may take Ray a moment to clean up:
    a name whose actor no longer answers is retried for up to ``wait_s``.
    """
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    name = "store-lock-" + hashlib.sha256(key.encode()).hexdigest()[:24]
    remote = ray.remote(num_cpus=0)(LockHolder).options(name=name, namespace=LOCK_NAMESPACE, lifetime="non_detached")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            actor = remote.remote(f"{holder_info()} (Ray job {ray.get_runtime_context().get_job_id()})")
            ray.get(actor.who.remote())
            break
        except ValueError:  # the name is taken
            try:
                holder = ray.get(ray.get_actor(name, namespace=LOCK_NAMESPACE).who.remote(), timeout=10)
            except (ValueError, RayActorError, GetTimeoutError):  # its driver died: Ray is removing it
                if time.monotonic() > deadline:
                    raise StoreLocked(f"store {key} is locked in the Ray cluster by a run that does not answer") from None
                time.sleep(0.5)
                continue
            raise StoreLocked(f"store {key} is locked by {holder}") from None
    try:
        yield
    finally:
        ray.kill(actor)


class ClassifierActor:
    """Ray actor: loads the model once, then runs ``stages.classify.predict`` on each batch of paths.

    A plain actor (started once per run and kept for every chunk), not a Ray
    Data actor pool: those restartable actors log an error-level
    ``core_worker.cc`` line for constructor arguments in the object store on
    every run (ray-project/ray#57733), and would load the model again per chunk.
    """

    def __init__(self, model: str, taxonomy: str | None, precision: str, batch_size: int, max_pixels: int,
                 threads: int) -> None:
        self.classifier = load_classifier(model, taxonomy, precision)  # "auto": this worker's GPU decides
        # XNNPACK sizes its pool to the CPUs the actor reserved, not the node's: several actors on one node
        # would otherwise each start a thread per core
        self.classifier.threads = threads
        self.batch_size = batch_size
        self.max_pixels = max_pixels

    def describe(self) -> Classifier:
        """The loaded model's labels, taxonomy, version and precision, without the network: what the driver
        needs to decide and write rows, so it never imports TensorFlow itself."""
        return dataclasses.replace(self.classifier, model=None, steps={})

    def classify(self, paths: list[bytes]) -> Predictions:
        return predict(self.classifier, [Path(os.fsdecode(p)) for p in paths], batch_size=self.batch_size,
                       max_pixels=self.max_pixels)


def concat_predictions(parts: list[Predictions], n_categories: int, n_groups: int) -> Predictions:
    """Predictions of consecutive batches as one, in order."""
    if not parts:
        z = np.zeros((0, 0), np.float32)
        return Predictions(np.zeros((0, n_categories), np.float32), np.zeros(0, np.float32),
                           np.zeros((0, n_groups), np.float32), [], [], z)
    return Predictions(
        probs=np.concatenate([p.probs for p in parts]), product_mass=np.concatenate([p.product_mass for p in parts]),
        group_mass=np.concatenate([p.group_mass for p in parts]),
        imagenet_top=[t for p in parts for t in p.imagenet_top], errors=[e for p in parts for e in p.errors],
        embeddings=np.concatenate([p.embeddings for p in parts]))


class SegmentSearchActor:
    """Ray actor: the kept photos' segments as bucket tables, built once per segment and kept for the run,
    searched with a range of each chunk's photos (``RaySegmentSearch``).

    A plain actor, not a Ray Data operator: the search needs no dataset, and
    Ray Data's restartable actors log an error for every constructor that
    takes an object-store argument (ray-project/ray#57733), noise in cron mail.
    """

    def __init__(self, cfg: DedupeConfig) -> None:
        self.cfg = cfg
        self.built: dict[int, PairSearch] = {}

    def keep(self, keys: list[int], segments: list) -> None:
        import ray

        # segments: object references (a list's are not resolved by Ray): zero-copy from the node's object store
        self.built = {k: self.built[k] if k in self.built else PairSearch(ray.get(ref), self.cfg)
                      for k, ref in zip(keys, segments)}

    def search(self, queries: HashArrays, before: np.ndarray, start: int, stop: int) -> list[dict[str, np.ndarray]]:
        return [b.search(start, stop, queries) for b in self.built.values()] + [
            PairSearch(queries, self.cfg).search(start, stop, before=before)]


class RaySegmentSearch:
    """``BatchIndex``'s search on Ray (``nearpairs.SearchHere`` on a cluster): each kept segment goes to the
    object store once, an actor per CPU builds its tables once (in parallel, when the segment is kept) and
    searches a range of each chunk's photos against them and against the chunk's earlier photos; only the
    verified pairs come back to the driver, whose walk decides.

    The actors reserve no CPU (``num_cpus=0``, spread over the nodes): they work only while the driver
    waits for them, and a pool holding CPUs for the whole run would starve the scan tasks and the
    classifier actors (on 2 CPUs that hangs silently).
    """

    def __init__(self, cfg: DedupeConfig, cpus: float) -> None:
        import ray

        remote = ray.remote(num_cpus=0, scheduling_strategy="SPREAD")(SegmentSearchActor)
        self.actors = [remote.remote(cfg) for _ in range(max(1, int(cpus)))]
        self.kept: list[tuple[HashArrays, int, Any]] = []  # (segment, key, object reference)
        self._keys = itertools.count()

    def keep(self, segments: list[HashArrays]) -> None:
        import ray

        self.kept = [next((e for e in self.kept if e[0] is s), None) or (s, next(self._keys), ray.put(s))
                     for s in segments]
        keys, refs = [k for _, k, _ in self.kept], [r for _, _, r in self.kept]
        ray.get([actor.keep.remote(keys, refs) for actor in self.actors])

    def __call__(self, queries: HashArrays, before: np.ndarray) -> list[dict[str, np.ndarray]]:
        import ray
        from ray.util import ActorPool

        shard = max(256, -(-len(queries) // len(self.actors)))
        ranges = [(a, min(a + shard, len(queries))) for a in range(0, len(queries), shard)]
        ref, before_ref = ray.put(queries), ray.put(before)
        parts = list(ActorPool(self.actors[:len(ranges)]).map(
            lambda actor, r: actor.search.remote(ref, before_ref, *r), ranges))
        return [{k: np.concatenate([p[i][k] for p in parts]) for k in parts[0][i]} for i in range(len(self.kept) + 1)]


def pool_size(cluster_cpus: float, gpus: float) -> tuple[int, float]:
    """(actors, CPUs per actor): leave CPUs for the read tasks so they are never starved."""
    if gpus >= 1:
        return int(gpus), 1.0
    actors = max(1, int(cluster_cpus // 2))
    return actors, max(1.0, (cluster_cpus - 1) / actors) if cluster_cpus > 2 else 1.0


def ray_engine(model: str, taxonomy: str | None, precision: str, cfg: RunConfig,
               address: str | None = None) -> tuple[Engine, Callable[[], Classifier]]:
    """The Ray runner's engine: scans as Ray Data tasks, classification on an actor pool, near pairs on
    another (``RaySegmentSearch``), the store's lock in the cluster; ``run`` does the rest. With it, a
    function that waits for the first classifier actor's ``describe``.

    The classifier actors start here, before anything is scanned: each imports TensorFlow and loads the
    model while the driver opens the store and the scans begin, and the driver itself loads no model.
    """
    import ray

    ref = resolve_model(model)  # workers may start elsewhere: give them absolute paths
    model = str(Path(ref).resolve()) if isinstance(ref, Path) else ref
    taxonomy = str(Path(taxonomy).resolve()) if taxonomy else None
    env = {k: os.environ[k] for k in ("LABELCAT_CACHE", "LABELCAT_MODELS", "TF_CPP_MIN_LOG_LEVEL",
                                      "TF_CPU_ALLOCATOR_USE_BFC") if k in os.environ}
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=True,
                 logging_level="ERROR", runtime_env={"env_vars": env} if env else None)
    ctx_data = ray.data.DataContext.get_current()
    ctx_data.enable_progress_bars = not cfg.quiet
    ctx_data.execution_options.preserve_order = True  # the input streams in rows' order, chunk by chunk
    # per-operator INFO lines (and, under --quiet, the "progress bars disabled" warning) are noise in cron mail
    logging.getLogger("ray.data").setLevel(logging.ERROR if cfg.quiet else logging.WARNING)
    resources = ray.cluster_resources()
    actors, actor_cpus = pool_size(resources.get("CPU", 1), resources.get("GPU", 0))

    def stream(source: Path, cfg: RunConfig, wanted: Callable[[int], bool]) -> Iterator[
            tuple[int, list[Record], dict[int, Scan | tuple[str, str]] | None]]:
        """The run's one Ray Data job: the input read (``IngestDatasource``) and scanned as it streams; the
        driver takes one chunk's records and scans at a time, in input order."""
        here = {"ray.io/node-id": ray.get_runtime_context().get_node_id()}  # as Ray Data's own local:// reads
        dataset = (ray.data.read_datasource(IngestDatasource(source, os.getcwd(), cfg.allow_outside, cfg.chunk_size,
                                                             wanted), num_cpus=0, label_selector=here)
                   .map_batches(_scan_batch, batch_size=scan_batch_size(cfg.chunk_size, resources.get("CPU", 1)),
                                batch_format="pyarrow", num_cpus=1,
                                fn_kwargs={"max_pixels": cfg.max_pixels, "max_bytes": cfg.max_bytes}))
        t = time.perf_counter()  # each chunk's "scan" seconds: how long the driver waited for it
        for n, table in enumerate(dataset.iter_batches(batch_size=cfg.chunk_size, batch_format="pyarrow")):
            batch = table.to_pydict()
            records = records_from_columns(batch)
            if records[0].row != n * cfg.chunk_size:  # the chunks must be the local runner's, or resume breaks
                raise RuntimeError(f"chunk {n} starts at row {records[0].row}: the input stream lost its order")
            scans = None
            if wanted(n):
                scans = {}
                for i, rec in enumerate(records):
                    if not batch["ok"][i]:
                        scans[rec.row] = (str(batch["error"][i]), str(batch["error_detail"][i]))
                        continue
                    scans[rec.row] = Scan(str(batch["sha256"][i]), int(batch["width"][i]), int(batch["height"][i]),
                                          Hashes.from_fields({k: batch[k][i] for k in HASH_FIELDS}),
                                          Quality(float(batch["pixel_std"][i]), float(batch["aspect_ratio"][i])),
                                          fidelity=int(batch["fidelity"][i]))
                cfg.log({"stage": "scan", "rows": len(records), "seconds": round(time.perf_counter() - t, 3)})
            yield n, records, scans
            t = time.perf_counter()

    gpus = resources.get("GPU", 0) >= 1
    remote = ray.remote(num_cpus=actor_cpus, num_gpus=1 if gpus else 0)(ClassifierActor)
    pool = [remote.remote(model, taxonomy, precision, cfg.batch_size, cfg.max_pixels, max(1, round(actor_cpus)))
            for _ in range(actors)]

    def classify(paths: list[Path], ready: list, clf, cfg: RunConfig, progress) -> Predictions:
        from ray.util import ActorPool

        step = max(cfg.batch_size, 8) * 4
        batches = [[os.fsencode(os.path.abspath(p)) for p in paths[i:i + step]] for i in range(0, len(paths), step)]
        parts = []
        for part in ActorPool(pool).map(lambda actor, b: actor.classify.remote(b), batches) if batches else []:
            parts.append(part)
            progress(len(part.errors))
        return concat_predictions(parts, len(clf.categories), len(clf.groups))

    attempt = uuid.uuid4().hex[:16]  # this driver's folder in the store's staging, for its workers' parts
    driver_node = ray.get_runtime_context().get_node_id()
    writers: dict[str, Any] = {}  # the store's writer, started with the first chunk

    def commit(store: Store, n: int, rows: pa.Table, index_records: list[dict[str, Any]],
               files: list[tuple[str, int, int]]) -> Callable[[], dict[str, Any]]:
        """The store's writer writes the chunk's parts while the driver decides the next chunks
        (``COMMITS_AHEAD``); waiting for it, the driver commits them. A folder store's writer runs on the
        driver's node (the folder need not be shared by every node; a writer there dies with its driver at
        once), an object store's anywhere."""
        if store.location not in writers:
            where = {} if not store.local else {
                "scheduling_strategy": NodeAffinitySchedulingStrategy(driver_node, soft=False)}
            writers[store.location] = ray.remote(num_cpus=0)(ChunkWriter).options(**where).remote(store, attempt)
        ref = writers[store.location].write.remote(n, rows, index_records, files)

        def wait() -> dict[str, Any]:
            writer = ray.get(ref)
            store.promote_chunk(n, attempt)
            return {"written_by": writer}
        return wait

    engine = Engine(
        None, classify, stream=stream, segment_search=lambda dedupe: RaySegmentSearch(dedupe, resources.get("CPU", 1)),
        lock=cluster_lock, commit=commit, commits_ahead=COMMITS_AHEAD,
        info={"name": "ray", "address": address or "local", "actors": actors, "actor_cpus": actor_cpus,
              "cluster": {k: v for k, v in resources.items() if k in ("CPU", "GPU", "memory")}},
        device=f"Ray ({actors} actor{'s' if actors > 1 else ''}, {'GPU' if gpus else 'CPU'})")
    return engine, lambda: ray.get(pool[0].describe.remote())


def run_ray(source: str | Path, out: str | Path | None, model: str, taxonomy: str | None, precision: str,
            cfg: RunConfig, address: str | None = None, classifier: Classifier | None = None):
    """Run the pipeline with the Ray engine; same rows, schema, store and exit codes as the local runner.

    Chunks as the local runner's, with or without ``--store``: the driver holds
    one chunk at a time (and the next one's scans), and each chunk's near pairs
    against every earlier chunk and night are searched on the cluster
    (``RaySegmentSearch``). The model loads on the classifier actors only
    (``precision`` "auto" is resolved there, where the GPUs are); the driver
    takes the labels, taxonomy and version from the first actor, unless the
    caller passes a ``classifier`` it loaded already.
    """
    engine, describe = ray_engine(model, taxonomy, precision, cfg, address)
    return run(source, out, classifier or describe(), cfg, engine)
