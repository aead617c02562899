"""Hostile and broken input, generated here: every file becomes one row with a precise reason."""

import csv
import io
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import EXIF_TRANSFORMS as TRANSFORMS, REPO, product_photo
from pipeline.cli import cli


def _png_bomb() -> bytes:
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 200_000, 200_000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


@pytest.fixture()
def corpus(tmp_path):
    d = tmp_path / "uploads"
    d.mkdir()
    photo = product_photo(seed=3)
    expect = {}

    def save(name, img, fmt, status, **kw):
        img.save(d / name, fmt, **kw)
        expect[name] = status

    def raw(name, data, status):
        (d / name).write_bytes(data)
        expect[name] = status

    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()
    raw("zero.jpg", b"", ("error", "empty"))
    raw("cut.jpg", jpeg[: len(jpeg) // 2], ("error", "truncated"))
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)).save(buf, "PNG")
    raw("cut.png", buf.getvalue()[: len(buf.getvalue()) // 2], ("error", "truncated"))
    raw("text.jpg", b"this is a shopping list, not a photo\n", ("error", "not_an_image"))
    raw("bomb.png", _png_bomb(), ("error", "too_large"))
    raw("phone.heic", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 200, ("error", "unsupported_format"))
    save("really_a_png.jpg", product_photo((20, 150, 140), seed=4), "PNG", ("ok", None))  # wrong extension
    save("sixteen.png", Image.fromarray((np.asarray(product_photo((60, 60, 60), seed=5).convert("L"), np.uint16) * 257)), "PNG", ("ok", None))
    save("print.jpg", product_photo((230, 200, 40), seed=6).convert("CMYK"), "JPEG", ("ok", None))
    pal = product_photo((60, 80, 170), seed=7).convert("P", palette=Image.ADAPTIVE, colors=64)
    save("palette.png", pal, "PNG", ("ok", None), transparency=0)
    frames = [product_photo((120, 60, 20), seed=8), product_photo((30, 120, 40), seed=9)]
    save("anim.gif", frames[0], "GIF", ("ok", None), save_all=True, append_images=frames[1:])
    save("anim.webp", product_photo((250, 120, 180), seed=10), "WEBP", ("ok", None), save_all=True,
         append_images=[product_photo((40, 40, 40), seed=11)])
    for o in range(1, 9):  # all eight EXIF orientations, each stored as a camera would store it
        exif = Image.Exif()
        exif[0x0112] = o
        stored = product_photo(((o * 30) % 255, 90, 200 - o * 20), (300, 240), shape="bag", seed=20 + o)
        for op in TRANSFORMS[o]:
            stored = stored.transpose(op)
        save(f"exif{o}.jpg", stored, "JPEG", ("ok", None), exif=exif.tobytes())
    name = os.fsdecode(b"caf\xe9 \xe2\x98\x95 shirt.jpg")  # Latin-1 byte, then real UTF-8 and spaces
    product_photo((200, 30, 30), seed=30).save(d / name, "JPEG")
    expect[name] = ("ok", None)
    (d / "loop").symlink_to(d)  # a symlink loop: not followed
    (d / "gone.jpg").symlink_to(d / "deleted-before-reading.jpg")  # listed, but nothing to read
    expect["gone.jpg"] = ("error", "missing")
    return d, expect


def test_every_hostile_file_is_one_row_with_a_reason(corpus, tmp_path):
    d, expect = corpus
    out = tmp_path / "out.parquet"
    r = CliRunner().invoke(cli, ["run", str(d), "--out", str(out), "--model", "tiny_test", "--quiet"])
    assert r.exit_code == 0, r.output
    t = pq.read_table(out).to_pandas()
    names = {os.path.basename(p): row for p, row in zip(t.path, t.itertuples())}
    shown = {os.fsencode(n).decode("utf-8", "backslashreplace") for n in expect}
    assert set(names) == shown  # nothing vanished, nothing extra (the loop was not followed)
    for name, (status, code) in expect.items():
        row = names[os.fsencode(name).decode("utf-8", "backslashreplace")]
        if status == "error":
            assert (row.status, row.error) == ("error", code), name
        else:
            assert row.status in ("labelled", "junk", "duplicate"), (name, row.status, row.error, row.error_detail)
    uprights = t[t.path.str.contains("exif")]
    assert set(zip(uprights.width, uprights.height)) == {(300, 240)}  # all eight upright


def test_a_file_that_disappears_between_listing_and_reading(tmp_path, monkeypatch):
    d = tmp_path / "uploads"
    d.mkdir()
    for i in range(3):
        product_photo(((i * 80) % 255, 100, 50), seed=i).save(d / f"p{i}.jpg")
    import pipeline.runners.local as run_mod

    real = run_mod.scan_records

    def racing(records, *a, **k):  # the scan's worker processes read what is left
        (d / "p1.jpg").unlink(missing_ok=True)  # deleted by the upload tool after the walk listed it
        return real(records, *a, **k)

    monkeypatch.setattr(run_mod, "scan_records", racing)
    out = tmp_path / "o.parquet"
    assert CliRunner().invoke(cli, ["run", str(d), "--out", str(out), "--model", "tiny_test", "-q"]).exit_code == 0
    t = pq.read_table(out).to_pandas().set_index("row")
    assert t.loc[1, "error"] == "missing" and t.loc[0, "status"] != "error" and t.loc[2, "status"] != "error"


def test_hostile_manifest(tmp_path):
    (tmp_path / "shop").mkdir()
    outside = tmp_path / "secret.jpg"
    product_photo(seed=1).save(outside)
    product_photo((20, 150, 140), seed=2).save(tmp_path / "shop" / "a.jpg")
    m = tmp_path / "shop" / "m.csv"
    m.write_bytes("\ufeffsku,path,category_hint,notes\n"
                  'A1,a.jpg,tops,"line one\nline two, with comma"\n'
                  "A1,a.jpg,tops,duplicate sku and path\n"
                  "A2,,tops,\n"
                  "A3,a.jpg\n"
                  "A4,../secret.jpg,tops,outside\n"
                  f"A5,{outside},tops,absolute outside\n".encode("utf-8"))
    out = tmp_path / "o.parquet"
    r = CliRunner().invoke(cli, ["run", str(m), "--out", str(out), "--model", "tiny_test", "-q"])
    assert r.exit_code == 0, r.output
    t = pq.read_table(out).to_pandas()
    assert list(t.sku) == ["A1", "A1", "A2", "A3", "A4", "A5"]
    assert t.notes[0] == "line one\nline two, with comma"
    assert t.status[1] == "duplicate" and t.duplicate_kind[1] == "exact"
    assert t.error[2] == "no_path" and t.status[3] != "error"  # missing cells are just empty
    assert list(t.error[4:]) == ["outside_manifest", "outside_manifest"]
    r = CliRunner().invoke(cli, ["run", str(m), "--out", str(out), "--model", "tiny_test", "-q", "--allow-outside"])
    t = pq.read_table(out).to_pandas()
    assert pd.isna(t.error[4]) and t.status[4] != "error"


def test_a_symlink_loop_in_a_manifest_is_one_unreadable_row(tmp_path):
    """A manifest row naming a symlink loop once failed the whole run (the containment check raised)."""
    (tmp_path / "loop").symlink_to("loop")
    product_photo().save(tmp_path / "ok.png")
    m = tmp_path / "m.csv"
    m.write_text("sku,path\nA,loop\nB,ok.png\n", encoding="utf-8")
    out = tmp_path / "o.parquet"
    r = CliRunner().invoke(cli, ["run", str(m), "--out", str(out), "--model", "tiny_test", "-q"])
    assert r.exit_code == 0, r.output
    t = pq.read_table(out).to_pandas()
    assert list(t.status) == ["error", "labelled"] and t.error[0] == "unreadable"


def _peak_rss_mb(args):
    """Run labelcat in a child and return the child's peak resident memory (MiB)."""
    code = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024); sys.exit(r.returncode)")
    cmd = [sys.executable, "-c", code, sys.executable, "-c", "from pipeline.cli import main; main()", *map(str, args)]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return int(p.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_million_row_manifest_streams_in_bounded_memory(tmp_path):
    def manifest(path, n):
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["sku", "path", "category_hint", "title"])
            for i in range(n):
                w.writerow([f"SKU-{i:07d}", f"photos/{i % 97}/upload_{i}.jpg", "tops", f"Product {i}, a long enough title"])

    manifest(tmp_path / "small.csv", 20_000)
    manifest(tmp_path / "big.csv", 1_000_000)
    small = _peak_rss_mb(["run", tmp_path / "small.csv", "--out", tmp_path / "s.parquet", "-q"])
    big = _peak_rss_mb(["run", tmp_path / "big.csv", "--out", tmp_path / "b.parquet", "-q"])
    meta = pq.read_metadata(tmp_path / "b.parquet")
    assert meta.num_rows == 1_000_000
    assert big - small < 200, f"peak memory grew from {small} MiB (20k rows) to {big} MiB (1M rows)"
