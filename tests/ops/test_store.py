"""Nightly runs that lose nothing: incremental, resumable after SIGKILL, locked."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import REPO, product_photo
from pipeline.cli import cli
from pipeline.ops.store import Store, dequantise, quantise

COLORS = [(200, 30, 30), (20, 150, 140), (40, 40, 40), (230, 200, 40), (60, 80, 170), (120, 60, 20),
          (250, 120, 180), (30, 120, 40)]


def make_shop(folder, n, start=0):
    """``n`` distinct products (shape x colour x seed), one per file."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        shape = "shirt" if i % 2 == 0 else "bag"
        product_photo(COLORS[i % len(COLORS)], (260, 260), shape=shape, seed=i).save(folder / f"p{i:03d}.jpg", quality=90)


def cli_run(*args):
    return CliRunner().invoke(cli, ["run", *map(str, args)])


def dataset(store):
    return pd.read_parquet(store / "labels")


def test_second_night_classifies_only_the_new_photos(tmp_path, card_model):
    shop = tmp_path / "uploads"
    make_shop(shop, 6)
    store = tmp_path / "store"
    r = cli_run(shop, "--store", store, "--model", card_model, "--out", tmp_path / "n1.parquet", "--chunk-size", "4", "-q")
    assert r.exit_code == 0, r.output
    night1 = pd.read_parquet(tmp_path / "n1.parquet")
    make_shop(shop, 2, start=6)  # two new products
    Image.open(shop / "p001.jpg").resize((180, 180)).save(shop / "p001_small.jpg")  # a near copy of last night's
    summary = tmp_path / "s2.json"
    r = cli_run(shop, "--store", store, "--model", card_model, "--out", tmp_path / "n2.parquet", "--summary-json", summary, "-q")
    assert r.exit_code == 0, r.output
    night2 = pd.read_parquet(tmp_path / "n2.parquet").set_index("path")
    assert json.loads(summary.read_text())["classified"] == 2
    old = [str(shop / f"p{i:03d}.jpg") for i in range(6)]
    assert (night2.loc[old, "status"] == "seen").all()
    first = night1.set_index("path")
    assert list(night2.loc[old, "label"]) == list(first.loc[old, "label"])
    assert night2.loc[str(shop / "p000.jpg"), "seen_in"] == f"{night1.run_id[0]}#{first.loc[str(shop / 'p000.jpg'), 'row']}"
    near = night2.loc[str(shop / "p001_small.jpg")]
    assert near.status == "duplicate" and near.duplicate_of_run == night1.run_id[0]
    assert near.duplicate_of == first.loc[str(shop / "p001.jpg"), "row"]
    assert set(night2.loc[[str(shop / "p006.jpg"), str(shop / "p007.jpg")], "status"]) <= {"labelled", "junk"}
    d = dataset(store)
    sizes = d.groupby("run_id").size()  # both nights, readable as one dataset
    assert sizes[night1.run_id[0]] == 6 and sizes[night2.run_id.iloc[0]] == 9
    assert night1.run_id[0] < night2.run_id.iloc[0]  # run ids sort in time
    assert sorted(d.run_date.astype(str).unique()) == [night1.processed_at[0].strftime("%Y-%m-%d")]

    r = cli_run(shop, "--store", store, "--model", card_model, "--out", tmp_path / "n3.parquet", "--skip-seen", "-q")
    assert r.exit_code == 0
    assert "seen" not in set(pd.read_parquet(tmp_path / "n3.parquet").status)


def test_a_new_model_version_relabels_only_on_demand(tmp_path):
    shop = tmp_path / "uploads"
    make_shop(shop, 3)
    store = tmp_path / "store"
    tax = tmp_path / "tax.json"
    tax.write_text(json.dumps({"name": "v2", "categories": {"tops": {"imagenet": ["jersey"]}, "bags": {"imagenet": ["purse"]}}}))
    assert cli_run(shop, "--store", store, "--model", "tiny_test", "--out", tmp_path / "a.parquet", "-q").exit_code == 0
    args = [shop, "--store", store, "--model", "tiny_test", "--taxonomy", tax, "-q"]
    assert cli_run(*args, "--out", tmp_path / "b.parquet").exit_code == 0
    assert set(pd.read_parquet(tmp_path / "b.parquet").status) == {"seen"}  # not silently relabelled
    assert cli_run(*args, "--out", tmp_path / "c.parquet", "--relabel").exit_code == 0
    c = pd.read_parquet(tmp_path / "c.parquet")
    assert "seen" not in set(c.status) and set(c.label) <= {"tops", "bags"}


def _subprocess_run(shop, store, model, out, fault=None, chunk=3, *extra):
    env = dict(os.environ, LABELCAT_CACHE=os.environ.get("LABELCAT_CACHE", ""))
    env.pop("LABELCAT_FAULT", None)
    if fault:
        env["LABELCAT_FAULT"] = fault
    cmd = [sys.executable, "-c", "from pipeline.cli import main; main()", "run", str(shop), "--store", str(store),
           "--model", str(model), "--chunk-size", str(chunk), "--out", str(out), "-q", *extra]
    return subprocess.Popen(cmd, cwd=REPO, env={k: v for k, v in env.items() if v}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _comparable(store):
    d = dataset(store).drop(columns=["run_id", "processed_at", "run_date"]).sort_values("row").reset_index(drop=True)
    return d


@pytest.mark.parametrize("fault", ["kill@after-chunk:0", "kill@after-chunk:2", "kill@after-chunk:4", "kill@mid-publish"])
def test_sigkill_then_rerun_equals_an_uninterrupted_run(tmp_path, card_model, fault):
    shop = tmp_path / "uploads"
    make_shop(shop, 14)
    Image.open(shop / "p002.jpg").save(shop / "p002_copy.png")  # a duplicate across chunks
    ref = tmp_path / "ref"
    p = _subprocess_run(shop, ref, card_model, tmp_path / "ref.parquet")
    assert p.wait(120) == 0, p.stderr.read()
    store = tmp_path / "store"
    p = _subprocess_run(shop, store, card_model, tmp_path / "out.parquet", fault=fault)
    assert p.wait(120) == -signal.SIGKILL
    if fault == "kill@mid-publish":  # --out is complete before the store publishes
        assert len(pd.read_parquet(tmp_path / "out.parquet")) == 15
    else:
        assert not (tmp_path / "out.parquet").exists()  # no half-written output
    if fault != "kill@mid-publish":
        assert not (store / "labels").exists()  # readers see nothing of the killed night
    p = _subprocess_run(shop, store, card_model, tmp_path / "out.parquet")
    assert p.wait(120) == 0, p.stderr.read()
    pd.testing.assert_frame_equal(_comparable(store), _comparable(ref))
    assert not (store / "staging").exists()
    assert len(list((store / "labels").glob("run_date=*/*"))) == 1
    out = pd.read_parquet(tmp_path / "out.parquet").sort_values("row")
    assert list(out.row) == list(range(15))


@pytest.mark.parametrize("fault", ["kill@before-publish", "kill@mid-publish"])
def test_a_kill_around_publish_never_loses_tonights_rows_from_out(tmp_path, card_model, fault):
    """With --skip-seen, a re-run after a kill near the publish still writes tonight's rows to --out."""
    shop = tmp_path / "uploads"
    make_shop(shop, 7)
    store, out = tmp_path / "store", tmp_path / "out.parquet"
    p = _subprocess_run(shop, store, card_model, out, fault, 3, "--skip-seen")
    assert p.wait(120) == -signal.SIGKILL
    p = _subprocess_run(shop, store, card_model, out, None, 3, "--skip-seen")
    assert p.wait(120) == 0, p.stderr.read()
    rows = pd.read_parquet(out)
    assert len(rows) == 7 and "seen" not in set(rows.status)
    assert len(list((store / "labels").glob("run_date=*/*"))) == 1


def test_a_photo_replaced_after_a_kill_is_read_again_on_resume(tmp_path, card_model):
    import hashlib

    shop = tmp_path / "uploads"
    make_shop(shop, 7)
    manifest = tmp_path / "manifest.csv"  # a manifest's bytes do not change when a photo does
    manifest.write_text("path\n" + "".join(f"uploads/p{i:03d}.jpg\n" for i in range(7)))
    store, out = tmp_path / "store", tmp_path / "out.parquet"
    p = _subprocess_run(manifest, store, card_model, out, "kill@after-chunk:0")
    assert p.wait(120) == -signal.SIGKILL
    product_photo((10, 200, 10), (300, 300), shape="bag", seed=99).save(shop / "p000.jpg", quality=80)  # same name
    new_sha = hashlib.sha256((shop / "p000.jpg").read_bytes()).hexdigest()
    p = _subprocess_run(manifest, store, card_model, out)
    assert p.wait(120) == 0, p.stderr.read()
    rows = pd.read_parquet(out).set_index("row")
    assert rows.loc[0, "sha256"] == new_sha and rows.loc[0, "width"] == 300


def test_parts_a_worker_wrote_count_once_its_driver_commits_them(tmp_path, card_model):
    """The Ray runner's workers write a chunk's parts into their driver's attempt folder; only the driver's
    ``promote_chunk`` commits them. Parts of a killed driver's attempt are never taken on resume, and an
    attempt folder a worker recreated after the re-run published (a zombie writer) is swept by the next run."""
    import pyarrow as pa

    store = Store(tmp_path / "store")
    store.claim()
    rows = pa.table({"row": [0, 1]})
    run_id, _, done = store.open_staging("fp", "v1", 2, "run-a", "2026-11-24", print)
    assert done == set()
    store.commit_chunk(0, rows, [], [], attempt="killed")
    store.commit_chunk(1, rows, [], [], attempt="live")
    store.promote_chunk(1, "live")
    _, _, done = store.open_staging("fp", "v1", 2, "run-b", "2026-11-24", print)  # the re-run resumes run-a
    assert done == {1} and not (tmp_path / "store" / "staging" / "attempts").exists()
    assert pq.read_table(tmp_path / "store" / "staging" / "labels" / "part-000001.parquet").equals(rows)

    shop = tmp_path / "uploads"
    make_shop(shop, 3)
    out = tmp_path / "n1.parquet"
    assert cli_run(shop, "--store", tmp_path / "night", "--model", card_model, "--out", out, "-q").exit_code == 0
    zombie = tmp_path / "night" / "staging" / "attempts" / "old" / "labels"
    zombie.mkdir(parents=True)
    pq.write_table(rows, zombie / "part-000000.parquet")
    make_shop(shop, 1, start=3)
    r = cli_run(shop, "--store", tmp_path / "night", "--model", card_model, "--out", tmp_path / "n2.parquet", "-q")
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "night" / "staging").exists() and len(dataset(tmp_path / "night")) == 3 + 4


def test_two_runs_at_once_and_a_stale_lock(tmp_path, card_model):
    shop = tmp_path / "uploads"
    make_shop(shop, 7)
    store = tmp_path / "store"
    first = _subprocess_run(shop, store, card_model, tmp_path / "a.parquet", fault="pause@after-chunk:0")
    deadline = time.time() + 60
    while not list((store / "staging" / "labels").glob("part-*.parquet")) and time.time() < deadline:
        time.sleep(0.1)  # until the first run holds the lock and has committed a chunk
    second = cli_run(shop, "--store", store, "--model", card_model, "--out", tmp_path / "b.parquet")
    assert second.exit_code == 3
    assert "is locked by pid" in second.output and str(first.pid) in second.output
    first.send_signal(signal.SIGKILL)  # the holder dies: its lock dies with it
    first.wait(30)
    third = cli_run(shop, "--store", store, "--model", card_model, "--out", tmp_path / "c.parquet", "--chunk-size", "3", "-q")
    assert third.exit_code == 0, third.output
    assert len(pd.read_parquet(tmp_path / "c.parquet")) == 7


def test_lock_is_exclusive_in_process(tmp_path):
    s = Store(tmp_path / "store")
    with s.lock():
        with pytest.raises(Exception, match="locked by pid"):
            with Store(tmp_path / "store").lock():
                pass
    with s.lock():  # released
        pass


def test_an_unwritable_store_fails_clearly_and_keeps_what_was_published(tmp_path, card_model, monkeypatch):
    shop = tmp_path / "uploads"
    make_shop(shop, 4)
    store = tmp_path / "store"
    assert cli_run(shop, "--store", store, "--model", card_model, "--out", tmp_path / "a.parquet", "-q").exit_code == 0
    before = dataset(store)
    make_shop(shop, 2, start=4)

    def read_only(*a, **k):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr("pipeline.ops.store.Store.commit_chunk", read_only)
    log = tmp_path / "run.log"
    r = cli_run(shop, "--store", store, "--model", card_model, "--out", tmp_path / "b.parquet", "--log-file", log, "-q")
    assert r.exit_code == 1 and "Read-only file system" in r.output
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert events[-1]["stage"] == "failed" and "Read-only" in events[-1]["error"]
    pd.testing.assert_frame_equal(dataset(store), before)
    assert not (tmp_path / "b.parquet").exists()


def test_seen_means_every_row_of_an_earlier_night(tmp_path, card_model):
    """Old broken files and old duplicates are seen on the next night: not new errors, not classified again."""
    shop = tmp_path / "uploads"
    make_shop(shop, 4)
    Image.open(shop / "p001.jpg").save(shop / "p001_copy.png")  # a near duplicate
    (shop / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    store = tmp_path / "store"
    r = cli_run(shop, "--store", store, "--model", card_model, "--out", tmp_path / "n1.parquet", "-q")
    assert r.exit_code == 0, r.output
    n1 = pd.read_parquet(tmp_path / "n1.parquet").set_index("path")
    assert {"duplicate", "error"} <= set(n1.status)
    make_shop(shop, 2, start=4)  # two new photos tonight
    log = tmp_path / "log.jsonl"
    r = cli_run(shop, "--store", store, "--model", card_model, "--out", tmp_path / "n2.parquet", "-q",
                "--fail-on-row-errors", "--log-file", log)
    assert r.exit_code == 0, r.output  # the broken file is an old error, not a new one
    n2 = pd.read_parquet(tmp_path / "n2.parquet").set_index("path")
    old = [p for p in n2.index if p in n1.index]
    assert set(n2.loc[old, "status"]) == {"seen"}
    broken = next(p for p in n2.index if p.endswith("broken.jpg"))
    assert n2.loc[broken, "error"] == n1.loc[broken, "error"] and n2.loc[broken, "seen_in"]
    classified = [json.loads(line) for line in log.read_text().splitlines() if '"stage": "classify"' in line]
    assert sum(e["rows"] for e in classified) == 2  # only tonight's new photos
    r = cli_run(shop, "--store", store, "--model", card_model, "--out", tmp_path / "n3.parquet", "-q", "--skip-seen")
    assert r.exit_code == 0 and len(pd.read_parquet(tmp_path / "n3.parquet")) == 0  # nothing new on night 3


def test_the_index_keeps_each_classified_photos_embedding_and_hint(tmp_path, card_model):
    shop = tmp_path / "uploads" / "tops"
    make_shop(shop, 4)
    Image.open(shop / "p001.jpg").save(shop / "p001_copy.png")
    store = tmp_path / "store"
    r = cli_run(shop.parent, "--store", store, "--model", card_model, "--out", tmp_path / "n1.parquet", "--embeddings", "-q")
    assert r.exit_code == 0, r.output
    out = pd.read_parquet(tmp_path / "n1.parquet").set_index("row")
    classified = out.status.isin(["labelled", "junk"])
    assert out.embedding[classified].map(len).nunique() == 1 and out.embedding[~classified].isna().all()
    history = Store(store).load_history()
    kept = [rec for rec in history.entries.values() if rec["embedding_q8"] is not None]
    assert len(kept) == classified.sum() and {rec["category_hint"] for rec in kept} == {"tops"}
    for rec in kept:
        stored = dequantise(rec["embedding_q8"], rec["embedding_scale"])
        written = out.embedding[rec["row"]].astype(np.float32)
        assert stored @ written / np.linalg.norm(stored) / np.linalg.norm(written) > 0.999
    r = cli_run(shop.parent, "--model", card_model, "--out", tmp_path / "plain.parquet", "-q")
    assert pd.read_parquet(tmp_path / "plain.parquet").embedding.isna().all()  # only on demand


def test_quantised_embeddings_keep_their_direction():
    x = np.random.default_rng(0).normal(size=(50, 1280)).astype(np.float32) * np.linspace(0.01, 5, 50)[:, None]
    x[0] = 0.0  # a zero row survives
    codes, scale = quantise(x)
    assert codes.dtype == np.int8 and scale.dtype == np.float32
    back = dequantise(codes, scale)
    cos = (back[1:] * x[1:]).sum(axis=1) / np.linalg.norm(back[1:], axis=1) / np.linalg.norm(x[1:], axis=1)
    assert cos.min() > 0.999 and not back[0].any()


def test_an_index_part_written_before_the_whole_photo_fields_still_loads(tmp_path):
    """A store kept by an earlier version has no ``phash_whole``, ``thumb`` or ``phash_inner`` columns: its records load with
    neither, and their hashes come back whole, for the hash rules alone."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.ops.store import INDEX_SCHEMA, read_index
    from pipeline.stages.dedupe import Hashes, compute_hashes

    fields = compute_hashes(product_photo((200, 40, 40), (120, 120))).to_fields()
    newer = ("phash_whole", "thumb", "phash_inner")
    old = pa.schema([f for f in INDEX_SCHEMA if f.name not in newer])
    rec = {"run_id": "r1", "row": 0, "sha256": "x", "in_dedupe": True, "status": "labelled",
           **{k: v for k, v in fields.items() if k not in newer}}
    pq.write_table(pa.Table.from_pylist([rec], schema=old), tmp_path / "part-000000.parquet")
    (back,) = read_index(tmp_path / "part-000000.parquet")
    assert back["phash_whole"] is None and back["thumb"] is None and back["phash_inner"] is None
    hashes = Hashes.from_fields(back)
    assert hashes.whole == () and hashes.thumb is None and hashes.inner is None
    assert hashes.phash_hex == fields["phash"]


def test_copies_found_after_the_model_hold_across_chunks_nights_and_a_kill(tmp_path):
    """The real default model on real photos, chunks of two: a badge copy that the hashes miss (chunk 1)
    becomes a duplicate of its original (chunk 0) after classification, and a smaller copy of that copy,
    which the hashes matched to it, points straight at the original; a third copy in the next chunk, which
    only matched the badge copy by hash, finds the original too. A SIGKILL after chunk 1 and a re-run give
    the same rows; on the next night a new badge copy is a duplicate of the first night's original."""
    from build import sale_badge as logo
    from conftest import SAMPLE, jpeg_copy
    from pipeline.stages.decode import decode

    shop = tmp_path / "uploads"
    shop.mkdir()
    beer = decode((SAMPLE / "images" / "beer/beer-01_1.jpg").read_bytes())
    badge = logo(beer)
    beer.save(shop / "a_beer.jpg", quality=95)
    Image.open(SAMPLE / "images" / "wine/wine-red.jpg").save(shop / "b_wine.jpg")
    badge.save(shop / "c_badge.jpg", quality=90)
    badge.resize((badge.width // 2, badge.height // 2)).save(shop / "d_badge_small.jpg", quality=90)
    jpeg_copy(badge, 60).save(shop / "e_badge_q60.png")
    for name, fault in (("ref", None), ("store", "kill@after-chunk:1")):
        p = _subprocess_run(shop, tmp_path / name, "efficientnet_lite0", tmp_path / f"{name}.parquet", fault, 2)
        assert p.wait(300) == (-signal.SIGKILL if fault else 0), p.stderr.read()
    p = _subprocess_run(shop, tmp_path / "store", "efficientnet_lite0", tmp_path / "store.parquet", None, 2)
    assert p.wait(300) == 0, p.stderr.read()
    pd.testing.assert_frame_equal(_comparable(tmp_path / "store"), _comparable(tmp_path / "ref"))
    rows = pd.read_parquet(tmp_path / "ref.parquet").set_index("path")
    by_name = {os.path.basename(p): r for p, r in rows.iterrows()}
    assert by_name["a_beer.jpg"].status == "labelled" and by_name["b_wine.jpg"].status == "labelled"
    for name in ("c_badge.jpg", "d_badge_small.jpg", "e_badge_q60.png"):
        assert by_name[name].status == "duplicate", name
        assert by_name[name].duplicate_of == by_name["a_beer.jpg"].row, name
        assert by_name[name].label == by_name["a_beer.jpg"].label
    jpeg_copy(logo(beer, 0.06), 85).save(shop / "f_badge_6.jpg")
    p = _subprocess_run(shop, tmp_path / "ref", "efficientnet_lite0", tmp_path / "night2.parquet", None, 2)
    assert p.wait(300) == 0, p.stderr.read()
    night2 = pd.read_parquet(tmp_path / "night2.parquet")
    new = night2[night2.path.str.endswith("f_badge_6.jpg")].iloc[0]
    assert new.status == "duplicate" and new.duplicate_of_run == rows.run_id.iloc[0]
    assert new.duplicate_of == by_name["a_beer.jpg"].row


def test_the_copy_check_groups_photos_by_the_label_their_rows_carry(tmp_path):
    """A juice carton the photo alone calls beauty_health, filed under juices and so labelled food_drink
    (the folder counts as evidence): its badge copy on the next night, filed alike, must still meet it. The
    store's index records carry the row's top-k, so tonight's photos are grouped for the copy check by the
    same label (photo and folder), not by the photo's own top category."""
    from build import sale_badge as logo
    from conftest import SAMPLE
    from pipeline.stages.decode import decode

    shop = tmp_path / "uploads" / "juices"
    shop.mkdir(parents=True)
    juice = decode((SAMPLE / "images" / "juices/fd_juice_01.jpg").read_bytes())
    juice.save(shop / "a_juice.jpg", quality=95)
    args = ["run", str(shop.parent), "--store", str(tmp_path / "store"), "--quiet"]
    assert CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "n1.parquet")]).exit_code == 0
    logo(juice).save(shop / "b_badge.jpg", quality=90)
    assert CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "n2.parquet")]).exit_code == 0
    first = pd.read_parquet(tmp_path / "n1.parquet").iloc[0]
    assert (first.label, first.label_source, first.topk_labels[0]) == ("food_drink", "hint", "food_drink")
    night2 = pd.read_parquet(tmp_path / "n2.parquet")
    copy = night2[night2.path.str.endswith("b_badge.jpg")].iloc[0]
    assert copy.status == "duplicate" and copy.duplicate_kind == "near", (copy.status, copy.junk_reason)
    assert (copy.duplicate_of, copy.duplicate_of_run) == (first.row, first.run_id)


class ObjectStoreLike(pafs.FileSystemHandler):
    """A ``pyarrow.fs`` handler over an in-memory filesystem that behaves as an object store does where it
    matters to the store: folders cannot be renamed (S3 and GCS move objects one by one, if at all)."""

    def __init__(self):
        from pyarrow._fs import _MockFileSystem

        self.fs = _MockFileSystem()
        self.moved = []

    def __eq__(self, other):
        return self is other

    def __ne__(self, other):
        return self is not other

    def get_type_name(self):
        return "objects"

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self.fs.delete_dir_contents("", accept_root_dir=True)

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        if self.fs.get_file_info(src).type == pafs.FileType.Directory:
            raise NotImplementedError("objects: folders cannot be renamed")
        self.moved.append(dest)
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path, metadata=metadata)


def test_a_store_on_an_object_store_makes_the_folder_stores_rows(tmp_path, card_model, monkeypatch):
    """The store through ``pyarrow.fs`` on a filesystem that has no folder rename and no flock: the local
    runner refuses it without a cluster's lock (exit 2 from the CLI); with one (a lock held elsewhere, as the
    Ray runner's named actor), two nights give the rows of a store in a local folder, an interrupted publish
    is completed file by file by the next run, and a second run is refused while the lock is held."""
    import contextlib
    import dataclasses
    import threading

    from pipeline.models.classifier import load_classifier
    from pipeline.ops import store as store_module
    from pipeline.ops.store import StoreLocked
    from pipeline.runners.local import RunConfig, local_engine, run

    r = cli_run(tmp_path, "--store", "mock:///store", "--model", card_model, "-q")
    assert r.exit_code == 2 and "on mock" in r.output and "--runner ray" in r.output
    r = cli_run(tmp_path, "--store", "mock://", "--model", card_model, "-q")
    assert r.exit_code == 2 and "names no folder" in r.output

    held = threading.Lock()

    @contextlib.contextmanager
    def cluster(key):
        assert key == "py::objects:shop/store"
        if not held.acquire(blocking=False):
            raise StoreLocked(f"store {key} is locked")
        try:
            yield
        finally:
            held.release()

    handler = ObjectStoreLike()
    remote = Store("shop/store", filesystem=pafs.PyFileSystem(handler))
    engine = dataclasses.replace(local_engine(), lock=cluster)
    clf = load_classifier(str(card_model), None, "float32")
    shop = tmp_path / "uploads"
    make_shop(shop, 5)
    folder = tmp_path / "store"

    def night(n, store, eng=None):
        out = tmp_path / f"{n}-{'remote' if store is remote else 'folder'}.parquet"
        run(shop, out, clf, RunConfig(quiet=True, store=store, chunk_size=2), eng)
        return pd.read_parquet(out).drop(columns=["run_id", "processed_at", "seen_in", "duplicate_of_run"])

    pd.testing.assert_frame_equal(night(1, remote, engine), night(1, folder))
    make_shop(shop, 2, start=5)
    Image.open(shop / "p001.jpg").resize((180, 180)).save(shop / "p001_small.jpg")

    def interrupted(name):
        if name == "mid-publish":
            raise OSError("connection reset")

    monkeypatch.setattr(store_module, "fault_point", interrupted)
    handler.moved.clear()
    with pytest.raises(OSError, match="connection reset"):
        night(2, remote, engine)
    monkeypatch.undo()

    def published(folder):
        return [p for p in handler.moved if p.startswith(f"shop/store/{folder}/")]

    assert len(published("index")) == 4 and not published("labels")  # tonight's index is out, its rows are not
    second = night(2, remote, engine)  # completes the publish, and there is nothing left to do
    pd.testing.assert_frame_equal(second, night(2, folder))
    assert set(second.status) >= {"seen", "duplicate"}
    assert len(published("labels")) == 4  # each part moved as one object (8 rows in chunks of 2)
    table = pq.read_table("shop/store/labels", filesystem=pafs.PyFileSystem(handler)).to_pandas()
    left = pafs.PyFileSystem(handler).get_file_info(pafs.FileSelector("shop/store", recursive=True))
    assert len(table) == 5 + 8 and not [i for i in left if "staging" in i.path]
    assert not [i for i in left if i.base_name.startswith(".") and i.base_name != ".labelcat-store"]  # no temporaries
    with cluster("py::objects:shop/store"), pytest.raises(StoreLocked):
        night(3, remote, engine)
