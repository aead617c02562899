"""``--runner ray``: the same stages as Ray Data operations, for more than one machine.

Why this shape: nothing here re-implements a stage. Ray Data only decides
*where* the stage functions run: the scan (read, sha256, decode, hashes,
quality) is ``map_batches`` over stateless tasks; classification runs on
plain actors started once per run, so each actor loads the model once and runs
the same ``tf.data`` loop (``stages.classify.predict``) on its batches, with a GPU per
actor when the cluster has them; assembling rows, junk rules and the Parquet
writer are the local runner's. Near duplicates: the kept photos' hashes go
into the object store as flat arrays once per segment, an actor pool keeps
their bucket tables and searches ranges of each chunk's photos against all of
them (``nearpairs.PairSearch``, multi-index hashing, never all pairs) and
returns only the verified pairs; the driver's kept-first walk over those pairs
is ``find_duplicates`` itself (README, "Runners").

The night is the local runner's loop (``run``) with this module's
``Engine``: chunks (the driver holds one at a time), with ``--store`` the
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
import hashlib
import itertools
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.models.classifier import Classifier, load_classifier, resolve_model
from pipeline.ops.device import has_gpu
from pipeline.ops.store import StoreLocked, holder_info
from pipeline.runners.local import Engine, RunConfig, run
from pipeline.stages.classify import Predictions, predict
from pipeline.stages.dedupe import VIEW_NAMES, DedupeConfig, Hashes
from pipeline.stages.junk import Quality
from pipeline.stages.nearpairs import HashArrays, PairSearch
from pipeline.stages.scan import Scan, scan_one

SCAN_BATCH = 16  # the fewest photos a scan task takes


def scan_batch_size(photos: int, cpus: float) -> int:
    """Photos per scan task: about four tasks per CPU of the cluster for a chunk, at least ``SCAN_BATCH``.

    Why not a fixed 16: a task costs Ray tens of milliseconds to schedule, as much as scanning a few
    photos, so a 2,048-row chunk of missing files took 3 s in 128 tasks on 2 CPUs (a million-row night
    on Ray spent most of its 40 minutes there); four tasks per CPU still spread the work evenly.
    """
    return max(SCAN_BATCH, -(-photos // max(1, int(4 * cpus))))


def _scan_batch(batch: dict[str, np.ndarray], max_pixels: int, max_bytes: int) -> dict[str, np.ndarray]:
    """Ray task: ``scan_one`` (the scan every runner uses) on each path of the batch."""
    out: dict[str, list[Any]] = {k: [] for k in ("row", "ok", "error", "error_detail", "sha256", "width", "height",
                                                 "phash", "phash256", "rotated", "color", "phash_whole", "thumb",
                                                 "pixel_std", "aspect_ratio")}
    for row, path, pre_error in zip(batch["row"], batch["resolved"], batch["pre_error"]):
        out["row"].append(int(row))
        known = tuple(str(pre_error).split("\t", 1)) if pre_error else None
        result = scan_one(Path(os.fsdecode(bytes(path))), max_pixels, max_bytes, known)  # type: ignore[arg-type]
        if isinstance(result, tuple):
            out["ok"].append(False)
            out["error"].append(result[0])
            out["error_detail"].append(result[1])
            for k in ("sha256", "phash", "phash256"):
                out[k].append("")
            out["rotated"].append([""] * (len(VIEW_NAMES) - 1))
            out["color"].append([0.0] * 48)
            out["phash_whole"].append([])
            out["thumb"].append(None)
            for k in ("width", "height", "pixel_std", "aspect_ratio"):
                out[k].append(0)
            continue
        s = result
        out["ok"].append(True)
        out["error"].append("")
        out["error_detail"].append("")
        out["sha256"].append(s.sha256)
        out["width"].append(s.width)
        out["height"].append(s.height)
        for k, v in s.hashes.to_fields().items():
            out[k].append(v)
        out["pixel_std"].append(s.quality.pixel_std)
        out["aspect_ratio"].append(s.quality.aspect_ratio)
    return {k: np.array(v, dtype=object) if k in ("rotated", "color", "phash_whole", "thumb") else np.array(v)
            for k, v in out.items()}


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

    def __init__(self, model: str, taxonomy: str | None, precision: str, batch_size: int, max_pixels: int) -> None:
        self.classifier = load_classifier(model, taxonomy, precision)
        self.batch_size = batch_size
        self.max_pixels = max_pixels

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


def ray_engine(model: str, taxonomy: str | None, classifier, cfg: RunConfig, address: str | None = None) -> Engine:
    """The Ray runner's engine: scans as Ray Data tasks, classification on an actor pool, near pairs on
    another (``RaySegmentSearch``), the store's lock in the cluster; ``run`` does the rest."""
    import ray

    ref = resolve_model(model)  # workers may start elsewhere: give them absolute paths
    model = str(Path(ref).resolve()) if isinstance(ref, Path) else ref
    taxonomy = str(Path(taxonomy).resolve()) if taxonomy else None
    env = {k: os.environ[k] for k in ("LABELCAT_CACHE", "LABELCAT_MODELS", "TF_CPP_MIN_LOG_LEVEL") if k in os.environ}
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=True,
                 logging_level="ERROR", runtime_env={"env_vars": env} if env else None)
    ctx_data = ray.data.DataContext.get_current()
    ctx_data.enable_progress_bars = not cfg.quiet
    # per-operator INFO lines (and, under --quiet, the "progress bars disabled" warning) are noise in cron mail
    logging.getLogger("ray.data").setLevel(logging.ERROR if cfg.quiet else logging.WARNING)
    resources = ray.cluster_resources()
    actors, actor_cpus = pool_size(resources.get("CPU", 1), resources.get("GPU", 0))

    def scan(records: list, cfg: RunConfig, preprocess) -> dict[int, Scan | tuple[str, str]]:
        items = [{"row": r.row, "resolved": os.fsencode(r.resolved), "pre_error": "\t".join(r.error) if r.error else ""}
                 for r in records]
        scanned = (ray.data.from_items(items)
                   .map_batches(_scan_batch, batch_size=scan_batch_size(len(items), resources.get("CPU", 1)),
                                fn_kwargs={"max_pixels": cfg.max_pixels, "max_bytes": cfg.max_bytes}, num_cpus=1)
                   .take_all()) if items else []
        scans: dict[int, Scan | tuple[str, str]] = {}
        for s in scanned:
            if not s["ok"]:
                scans[int(s["row"])] = (str(s["error"]), str(s["error_detail"]))
                continue
            scans[int(s["row"])] = Scan(str(s["sha256"]), int(s["width"]), int(s["height"]), Hashes.from_fields(s),
                                        Quality(float(s["pixel_std"]), float(s["aspect_ratio"])))
        return scans

    pool: list = []  # the classifier actors, started on the first chunk that needs them, kept for the run

    def classify(paths: list[Path], ready: list, clf, cfg: RunConfig, progress) -> Predictions:
        from ray.util import ActorPool

        if paths and not pool:
            remote = ray.remote(num_cpus=actor_cpus, num_gpus=1 if resources.get("GPU", 0) >= 1 else 0)(ClassifierActor)
            pool.extend(remote.remote(model, taxonomy, clf.precision, cfg.batch_size, cfg.max_pixels)
                        for _ in range(actors))
        step = max(cfg.batch_size, 8) * 4
        batches = [[os.fsencode(p) for p in paths[i:i + step]] for i in range(0, len(paths), step)]
        parts = []
        for part in ActorPool(pool).map(lambda actor, b: actor.classify.remote(b), batches) if batches else []:
            parts.append(part)
            progress(len(part.errors))
        return concat_predictions(parts, len(clf.categories), len(clf.taxonomy.groups) if clf.taxonomy else 0)

    return Engine(
        scan, classify, segment_search=lambda dedupe: RaySegmentSearch(dedupe, resources.get("CPU", 1)),
        scan_ahead=True, lock=cluster_lock,
        info={"name": "ray", "address": address or "local", "actors": actors, "actor_cpus": actor_cpus,
              "cluster": {k: v for k, v in resources.items() if k in ("CPU", "GPU", "memory")}},
        device=f"Ray ({actors} actor{'s' if actors > 1 else ''}, {'GPU' if has_gpu() else 'CPU'})")


def run_ray(source: str | Path, out: str | Path | None, model: str, taxonomy: str | None, precision: str,
            cfg: RunConfig, address: str | None = None, classifier: Classifier | None = None):
    """Run the pipeline with the Ray engine; same rows, schema, store and exit codes as the local runner.

    Chunks as the local runner's, with or without ``--store``: the driver holds
    one chunk at a time (and the next one's scans), and each chunk's near pairs
    against every earlier chunk and night are searched on the cluster
    (``RaySegmentSearch``). ``classifier``: the driver's copy of the model
    (labels, taxonomy, version) when the caller loaded it already (the CLI
    does, to report a bad model as a usage error); the actors load their own.
    """
    classifier = classifier or load_classifier(model, taxonomy, precision)
    return run(source, out, classifier, cfg, ray_engine(model, taxonomy, classifier, cfg, address))
