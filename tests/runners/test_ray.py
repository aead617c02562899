"""The Ray Data runner: same rows as the local runner, locally and on a real (local) cluster."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from conftest import REPO, SAMPLE
from pipeline.cli import cli

ray = pytest.importorskip("ray")
COMPARE = ["row", "path", "status", "label", "topk_labels", "duplicate_of", "duplicate_kind", "junk_reason", "error",
           "sha256", "phash", "width", "height"]


def _same_rows(a: Path, b: Path) -> None:
    x = pq.read_table(a).to_pandas()[COMPARE]
    y = pq.read_table(b).to_pandas()[COMPARE]
    pd.testing.assert_frame_equal(x, y)
    conf_a = pq.read_table(a).to_pandas().confidence
    conf_b = pq.read_table(b).to_pandas().confidence
    assert ((conf_a - conf_b).abs().fillna(0) < 1e-4).all()


@pytest.mark.slow
def test_ray_runner_matches_the_local_runner_on_sample_catalog(tmp_path, capfd):
    local, distributed = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    r = CliRunner().invoke(cli, ["run", str(SAMPLE / "manifest.csv"), "--out", str(local), "-q"])
    assert r.exit_code == 0, r.output
    try:
        r = CliRunner().invoke(cli, ["run", str(SAMPLE / "manifest.csv"), "--out", str(distributed), "-q", "--runner", "ray"])
        assert r.exit_code == 0, r.output
    finally:
        ray.shutdown()
    _same_rows(local, distributed)
    meta = pq.read_schema(distributed).metadata[b"labelcat.run"].decode()
    assert '"runner": {"name": "ray"' in meta
    assert "core_worker" not in capfd.readouterr().err  # no error-level Ray line in a normal (cron) run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_using(marker: str) -> list[int]:
    """Processes whose command line mentions ``marker`` (our cluster's temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.fixture()
def local_cluster():
    """``ray start --head`` on 127.0.0.1; stopped afterwards by killing exactly its own processes."""
    temp = tempfile.mkdtemp(prefix="rl", dir="/tmp")  # short: Ray's socket paths have a length limit
    port = _free_port()
    ray_bin = Path(sys.executable).with_name("ray")
    cmd = [str(ray_bin) if ray_bin.exists() else "ray", "start", "--head", "--node-ip-address=127.0.0.1",
           f"--port={port}", "--num-cpus=2", f"--temp-dir={temp}", "--include-dashboard=false",
           "--disable-usage-stats"]
    # Its own token, for the cluster and for every client the test starts: Ray 2.59+ authenticates local
    # clusters by default, and a client would otherwise send the token an earlier local Ray left in
    # ~/.ray/auth_token (the second cluster of a session then refuses it).
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.urandom(16).hex())
    subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=120)
    try:
        yield f"127.0.0.1:{port}", env
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _pids_using(temp):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + 10
            while _pids_using(temp) and time.time() < deadline:
                time.sleep(0.2)
        assert not _pids_using(temp)


@pytest.mark.slow
def test_ray_runner_on_a_real_local_cluster(tmp_path, local_cluster):
    address, env = local_cluster
    data = SAMPLE / "images" / "sneakers"
    local = tmp_path / "local.parquet"
    assert CliRunner().invoke(cli, ["run", str(data), "--out", str(local), "-q"]).exit_code == 0
    out = tmp_path / "cluster.parquet"
    # the driver loads no model (the classifier actors do): TensorFlow is never imported in its process
    driver = ("import sys; from pipeline.cli import cli; cli(standalone_mode=False); "
              "print('tensorflow imported' if 'tensorflow' in sys.modules else 'no tensorflow')")
    p = subprocess.run([sys.executable, "-c", driver, "run", str(data), "--out", str(out),
                        "-q", "--runner", "ray", "--ray-address", address], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().endswith("no tensorflow"), p.stdout[-1000:]
    _same_rows(local, out)
    assert '"address": "127.0.0.1:' in pq.read_schema(out).metadata[b"labelcat.run"].decode()


@pytest.mark.slow
def test_two_nights_with_a_store_make_the_local_runners_rows(tmp_path):
    """--runner ray --store: chunks, the store's index, seen photos and near duplicates across nights, the same
    rows as the local runner night after night (night 2 adds photos, one of them a copy of a night-1 photo)."""
    import shutil

    night1 = tmp_path / "uploads"
    for cls in ("hoodies", "juices"):
        shutil.copytree(SAMPLE / "images" / cls, night1 / cls)
    stores = {"local": tmp_path / "store-local", "ray": tmp_path / "store-ray"}
    outs = {}
    try:
        for night in (1, 2):
            if night == 2:
                shutil.copytree(SAMPLE / "images" / "polos", night1 / "polos")
                shutil.copy(SAMPLE / "images" / "hoodies" / "cl_bogo01_1.jpg", night1 / "polos" / "again.jpg")
            for runner, store in stores.items():
                out = tmp_path / f"{runner}-{night}.parquet"
                args = ["run", str(night1), "--out", str(out), "-q", "--store", str(store), "--chunk-size", "5",
                        "--log-file", str(tmp_path / f"{runner}.log")]
                r = CliRunner().invoke(cli, args + (["--runner", "ray"] if runner == "ray" else []))
                assert r.exit_code == 0, r.output
                outs[(runner, night)] = out
    finally:
        ray.shutdown()
    for night in (1, 2):
        _same_rows(outs[("local", night)], outs[("ray", night)])
    second = pq.read_table(outs[("ray", 2)]).to_pandas()
    assert (second.status == "seen").sum() >= 10 and "duplicate" in set(second.status)
    for store in stores.values():
        assert len(list((store / "labels").glob("run_date=*/*"))) == 2
    # the Ray runner's Parquet parts are written by its workers, not by the driver (this process)
    commits = [e for e in map(json.loads, (tmp_path / "ray.log").read_text().splitlines()) if e["stage"] == "commit"]
    chunks = sum(-(-pq.read_metadata(outs[("ray", night)]).num_rows // 5) for night in (1, 2))
    assert len(commits) == chunks and all(e["written_by"] and not e["written_by"].startswith(f"pid {os.getpid()} ")
                                          for e in commits)


def test_ray_usage_errors(tmp_path):
    (tmp_path / "m.csv").write_text("path\nx.jpg\n")
    r = CliRunner().invoke(cli, ["run", str(tmp_path / "m.csv"), "--ray-address", "127.0.0.1:1"])
    assert r.exit_code == 2 and "needs --runner ray" in r.output


def test_pool_is_sized_to_leave_cpus_for_reads():
    from pipeline.runners.ray import pool_size

    assert pool_size(2, 0) == (1, 1.0)  # 2 cores: one actor, one core left for the read tasks
    actors, cpus = pool_size(16, 0)
    assert actors * cpus < 16
    assert pool_size(32, 4) == (4, 1.0)  # one actor per GPU


def test_a_classifier_actor_runs_xnnpack_on_the_cpus_it_reserved(tmp_path, card_model, monkeypatch):
    """Several actors share a node: each one's XNNPACK pool is the CPUs it reserved, not one thread per core."""
    from pipeline.models.lite import LiteStep
    from pipeline.runners.ray import ClassifierActor
    from pipeline.stages.decode import DEFAULT_MAX_PIXELS

    monkeypatch.setenv("LABELCAT_CACHE", str(tmp_path / "cache"))
    photo = SAMPLE / "images" / "hoodies" / "cl_bogo01_1.jpg"
    for threads in (1, 2):
        actor = ClassifierActor(str(card_model), None, "float32", 8, DEFAULT_MAX_PIXELS, threads)
        preds = actor.classify([os.fsencode(photo)])
        step, engine = actor.classifier.steps["xnnpack"]
        assert engine == "xnnpack" and isinstance(step, LiteStep) and step.threads == threads
        assert preds.probs.shape == (1, 3) and preds.errors == [None]


def test_scan_tasks_are_sized_to_about_four_per_cpu():
    from pipeline.runners.ray import SCAN_BATCH, scan_batch_size

    assert scan_batch_size(2048, 2) == 256  # a chunk on 2 CPUs: 8 tasks, not 128 of 16
    assert scan_batch_size(2048, 64) == SCAN_BATCH  # a large cluster: small tasks, all CPUs busy
    assert scan_batch_size(3, 2) == SCAN_BATCH and scan_batch_size(2049, 2) == 257


def test_pair_search_on_ray_actors_makes_the_local_decisions():
    """The chunked index searching on Ray actors (earlier nights, then uneven chunks large enough for several
    shards, the kept photos' segments built and merged on the actors) decides as asking photo by photo."""
    from conftest import clustered_candidates

    from pipeline.runners.ray import RaySegmentSearch
    from pipeline.stages.dedupe import Candidate, DedupeConfig, DedupeIndex, find_duplicates
    from pipeline.stages.nearpairs import BatchIndex

    cands = clustered_candidates(2400, seed=4)
    history = [Candidate(-1 - c.row, c.sha256, c.area, c.hashes) for c in cands[:600]]
    tonight = [Candidate(c.row - 600, c.sha256, c.area, c.hashes) for c in cands[600:]]
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        walk, batch = DedupeIndex(), BatchIndex(search=RaySegmentSearch(DedupeConfig(), 2))
        for h in history:
            walk.add(h.row, h.sha256, h.hashes)
            batch.add(h.row, h.sha256, h.hashes)
        found = 0
        bounds = [0, 700, 701, 1200, 1800]
        for a, b in zip(bounds, bounds[1:]):
            expected = find_duplicates(tonight[a:b], index=walk)
            assert find_duplicates(tonight[a:b], index=batch) == expected
            found += sum(m.kept < 0 for m in expected.values())
    finally:
        ray.shutdown()
    assert found > 50 and len(batch._segments) <= 3


@pytest.mark.slow
def test_a_killed_driver_resumes_on_a_real_cluster(tmp_path, local_cluster, card_model):
    """--runner ray --store on a real ``ray start --head`` cluster: while the driver works, the store's lock is
    held in the cluster too (another client of the cluster is refused, as a run on another host would be);
    the driver SIGKILLed after its second chunk releases it, and a run again leaves the store with the rows
    of an uninterrupted run (the lock, staging and publish are the local runner's loop; the cluster's workers
    of the killed job go with its driver)."""
    import shutil

    address, env = local_cluster
    shop = tmp_path / "uploads"
    for cls in ("sneakers", "polos"):
        shutil.copytree(SAMPLE / "images" / cls, shop / cls)

    def start(store: str, fault: str | None = None) -> subprocess.Popen:
        e = {k: v for k, v in env.items() if k != "LABELCAT_FAULT"} | ({"LABELCAT_FAULT": fault} if fault else {})
        return subprocess.Popen([sys.executable, "-c", "from pipeline.cli import main; main()", "run", str(shop),
                                 "--store", str(tmp_path / store), "--out", str(tmp_path / f"{store}.parquet"),
                                 "--model", str(card_model), "--chunk-size", "4", "-q", "--runner", "ray",
                                 "--ray-address", address], cwd=REPO, env=e, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def run(store: str) -> None:
        p = start(store)
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]

    run("ref")
    p = start("store", "pause@after-chunk:1")  # sleeps holding the store's locks once chunk 1 is committed
    committed = tmp_path / "store" / "staging" / "labels" / "part-000001.parquet"
    deadline = time.time() + 300
    while not committed.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert committed.exists(), p.communicate()[1][-3000:]
    # Another client of the cluster (a fresh process: a client keeps the first auth token it read) asks for the
    # store's cluster lock, as a run on another host would: refused, naming the Ray job that holds it.
    other = subprocess.run([sys.executable, "-c", (
        "import sys, ray\n"
        "from pipeline.ops.store import StoreLocked\n"
        "from pipeline.runners.ray import cluster_lock\n"
        f"ray.init(address={address!r}, log_to_driver=False, logging_level='ERROR')\n"
        "try:\n"
        f"    with cluster_lock({'local:' + str(tmp_path / 'store')!r}):\n"
        "        sys.exit(0)\n"
        "except StoreLocked as exc:\n"
        "    print(exc)\n"
        "    sys.exit(3)\n")], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert other.returncode == 3 and "(Ray job" in other.stdout, other.stdout + other.stderr[-3000:]
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    assert not (tmp_path / "store" / "labels").exists()  # readers see nothing of the killed night
    run("store")  # the killed driver's locks went with it

    def rows(store: str) -> pd.DataFrame:
        d = pd.read_parquet(tmp_path / store / "labels").drop(columns=["run_id", "processed_at", "run_date"])
        return d.sort_values("row").reset_index(drop=True)

    pd.testing.assert_frame_equal(rows("store"), rows("ref"))
    assert len(rows("ref")) == 11 and not (tmp_path / "store" / "staging").exists()


@pytest.mark.slow
@pytest.mark.parametrize("runner", ["local", "ray"])
def test_driver_memory_stays_flat_as_the_manifest_grows(tmp_path, card_model, runner, monkeypatch):
    """The driver streams the input chunk by chunk (Ray: one dataset read and scanned on the workers), so
    while it decides a chunk of an 8,000-row manifest it holds the input records of at most two chunks
    (the local runner: the one it decides and the one scanned ahead; Ray: the one it decides), never all.

    Counted as live objects (``gc``) each time a chunk is decided, not as bytes: ``tracemalloc`` also counts
    what other threads of the test process allocate meanwhile, and after the cluster tests it reported
    several MB that were not the run's. Checked by hand: with the input held as one chunk the test fails.
    """
    import gc

    from pipeline.models.classifier import load_classifier
    from pipeline.runners import local
    from pipeline.runners.local import RunConfig, run
    from pipeline.runners.ray import run_ray
    from pipeline.stages.ingest import Record

    clf, n, chunk = load_classifier(str(card_model), None, "float32"), 8000, 500
    held = []  # live input records each time a chunk is decided
    decide = local.process_chunk

    def counting(records, ctx, processed_at, scans):
        held.append(sum(isinstance(o, Record) for o in gc.get_objects()))
        return decide(records, ctx, processed_at, scans)

    monkeypatch.setattr(local, "process_chunk", counting)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,sku,colour\n" + "".join(f"gone/{i:07d}.jpg,S{i:07d},red\n" for i in range(n)))
    out, cfg = tmp_path / "out.parquet", RunConfig(chunk_size=chunk, quiet=True)
    try:
        if runner == "ray":
            run_ray(manifest, out, str(card_model), None, "float32", cfg, classifier=clf)
        else:
            run(manifest, out, clf, cfg)
    finally:
        ray.shutdown()
    assert pq.read_metadata(out).num_rows == n  # every row came out (missing files: error rows)
    assert len(held) == n // chunk and chunk <= max(held) <= 2 * chunk, held
