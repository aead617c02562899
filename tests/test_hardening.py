"""Issue-13 hardening: nothing hangs, nothing of the user's is deleted, every bad input gets one clear line.

Each test failed before its fix.
"""

import io
import os
import signal
import struct
from contextlib import contextmanager

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image, PngImagePlugin

from conftest import product_photo
from pipeline.cli import cli
from pipeline.stages.decode import DecodeError, open_image, read_bytes


@contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the suite) if the block blocks."""
    def boom(*_):
        raise TimeoutError(f"blocked for {seconds} s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_a_fifo_named_like_a_photo_is_not_a_file_and_never_blocks(tmp_path):
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    with deadline(10), pytest.raises(DecodeError) as exc:
        read_bytes(fifo)
    assert exc.value.code == "not_a_file" and "FIFO" in exc.value.detail


def test_a_run_over_a_folder_with_a_fifo_finishes_with_a_row_for_it(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    product_photo(seed=1).save(src / "a.jpg")
    os.mkfifo(src / "x.jpg")
    out = tmp_path / "o.parquet"
    with deadline(120):
        r = CliRunner().invoke(cli, ["run", str(src), "-o", str(out), "--store", str(tmp_path / "st"),
                                     "--model", "tiny_test", "-q"])
    assert r.exit_code == 0, r.output
    rows = pq.read_table(out).to_pandas().set_index("path")
    assert rows.loc[str(src / "x.jpg"), "error"] == "not_a_file"


def _ico_wrapping_png(side: int) -> bytes:
    png = io.BytesIO()
    Image.new("RGBA", (side, side)).save(png, "PNG")
    data = png.getvalue()
    header = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(data), 22)
    return header + data


def test_an_ico_entry_is_size_checked_before_it_is_decoded(monkeypatch):
    decoded = []
    real = PngImagePlugin.PngImageFile.load
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: decoded.append(self.size) or real(self))
    with pytest.raises(DecodeError) as exc:
        open_image(_ico_wrapping_png(2000), max_pixels=1_000_000)
    assert exc.value.code == "too_large" and decoded == []
    assert open_image(_ico_wrapping_png(64), max_pixels=1_000_000).size == (64, 64)  # small icons still open


def test_train_never_replaces_a_folder_that_is_not_a_model(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    r = CliRunner().invoke(cli, ["train", "fashion-mnist", "--arch", "dense_784_50_50_10", "--out", str(precious)])
    assert r.exit_code == 2 and "not a labelcat model folder" in r.output
    assert (precious / "thesis.txt").read_text() == "years of work"


def test_train_refuses_to_write_over_its_own_data(tmp_path):
    data = tmp_path / "shop"
    (data / "tops").mkdir(parents=True)
    product_photo(seed=1).save(data / "tops" / "a.jpg")
    for out in (data, data / "tops", data / "new-model", tmp_path):
        r = CliRunner().invoke(cli, ["train", str(data), "--out", str(out)])
        assert r.exit_code == 2 and "overlaps the training data" in r.output
    assert (data / "tops" / "a.jpg").is_file()


def test_train_replaces_an_existing_model_only_with_force(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "card.json").write_text("{}")
    (model / "model.keras").write_bytes(b"old")
    r = CliRunner().invoke(cli, ["train", "fashion-mnist", "--arch", "dense_784_50_50_10", "--out", str(model)])
    assert r.exit_code == 2 and "--force" in r.output
    assert (model / "model.keras").read_bytes() == b"old"


def test_a_store_with_foreign_content_is_refused_and_left_alone(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    product_photo(seed=1).save(src / "a.jpg")
    for name, setup in (("staging", lambda st: (st / "staging").mkdir(parents=True) or (st / "staging" / "mine.txt").write_text("x")),
                        ("foreign", lambda st: st.mkdir() or (st / "notes.txt").write_text("x"))):
        st = tmp_path / f"store-{name}"
        setup(st)
        before = sorted(p.relative_to(st) for p in st.rglob("*"))
        r = CliRunner().invoke(cli, ["run", str(src), "-o", str(tmp_path / "o.parquet"), "--store", str(st),
                                     "--model", "tiny_test", "-q"])
        assert r.exit_code == 2, r.output
        assert "labelcat did not create" in r.output or "not labelcat's staging" in r.output
        assert sorted(p.relative_to(st) for p in st.rglob("*")) == before


def test_a_symlinked_store_lock_is_not_followed(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    product_photo(seed=1).save(src / "a.jpg")
    st = tmp_path / "st"
    st.mkdir()
    target = tmp_path / "victim.txt"
    target.write_text("keep me")
    (st / "lock").symlink_to(target)
    r = CliRunner().invoke(cli, ["run", str(src), "-o", str(tmp_path / "o.parquet"), "--store", str(st),
                                 "--model", "tiny_test", "-q"])
    assert r.exit_code == 2, r.output
    assert target.read_text() == "keep me"
