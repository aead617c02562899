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
                        ("foreign", lambda st: st.mkdir() or (st / "notes.txt").write_text("x")),
                        # the attempt folders a killed Ray driver's worker can leave hold only labelcat's parts
                        ("attempt", lambda st: (st / "staging" / "attempts" / "x").mkdir(parents=True)
                         or (st / "staging" / "attempts" / "x" / "notes.txt").write_text("x"))):
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


def test_an_unreadable_subfolder_gets_a_row_not_silence():
    """A folder that cannot be listed is one `unreadable` row. As root the kernel lists any folder, so the
    walk runs in a child that dropped to `nobody` (in a world-traversable folder)."""
    import pwd
    import shutil
    import tempfile
    from pathlib import Path

    base = Path(tempfile.mkdtemp(prefix="labelcat-unreadable-", dir="/tmp"))
    src = base / "in"
    (src / "secret").mkdir(parents=True)
    (src / "secret" / "b.jpg").write_bytes(b"x")
    (src / "a.jpg").write_bytes(b"x")
    os.chmod(base, 0o755)
    os.chmod(src, 0o755)
    os.chmod(src / "secret", 0)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(r)
            if os.getuid() == 0:
                os.setgid(pwd.getpwnam("nobody").pw_gid)
                os.setuid(pwd.getpwnam("nobody").pw_uid)
            from pipeline.stages.ingest import ingest

            text = "\n".join(f"{rec.path}|{rec.error[0] if rec.error else ''}" for rec in ingest(src).records)
            os.write(w, text.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as fh:
        lines = fh.read().splitlines()
    os.waitpid(pid, 0)
    os.chmod(src / "secret", 0o755)
    shutil.rmtree(base)
    got = dict(line.rsplit("|", 1) for line in lines)
    assert got[str(src / "a.jpg")] == "" and got[str(src / "secret")] == "unreadable"


def _shop_run(tmp_path, manifest_header="sku,path,category_hint", cells=("S1", "a.jpg", "tops")):
    product_photo(seed=1).save(tmp_path / "a.jpg")
    (tmp_path / "m.csv").write_text(manifest_header + "\n" + ",".join(cells) + "\n")
    out = tmp_path / "run.parquet"
    r = CliRunner().invoke(cli, ["run", str(tmp_path / "m.csv"), "-o", str(out), "--model", "tiny_test", "-q",
                                 "--corrections", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    return out


def test_formula_headers_and_class_names_are_text_in_every_sheet(tmp_path):
    import zipfile

    out = _shop_run(tmp_path, 'sku,path,category_hint,"=HYPERLINK(""http://x"",""click"")"', ("S1", "a.jpg", "tops", "v"))
    xlsx, csv_path = tmp_path / "r.xlsx", tmp_path / "r.csv"
    for path in (xlsx, csv_path):
        assert CliRunner().invoke(cli, ["review", "export", str(out), "--out", str(path), "--threshold", "1"]).exit_code == 0
    with zipfile.ZipFile(xlsx) as z:
        for name in z.namelist():
            if name.startswith("xl/worksheets/"):
                xml = z.read(name).decode()
                assert "<f>" not in xml and "<f " not in xml, name
    header = csv_path.read_text(encoding="utf-8-sig").splitlines()[0]
    assert not any(h.startswith(("=", "+", "-", "@")) for h in header.split(","))


def test_manifest_columns_named_like_reviewer_columns_never_prefill_the_sheet(tmp_path):
    out = _shop_run(tmp_path, "sku,path,category_hint,corrected_label,note,reason", ("S1", "a.jpg", "tops", "junk", "n", "r"))
    xlsx = tmp_path / "r.xlsx"
    assert CliRunner().invoke(cli, ["review", "export", str(out), "--out", str(xlsx), "--threshold", "1"]).exit_code == 0
    from openpyxl import load_workbook

    ws = load_workbook(xlsx)["review"]
    header = [c.value for c in ws[1]]
    assert ws.cell(2, header.index("corrected_label") + 1).value is None
    assert ws.cell(2, header.index("input_corrected_label") + 1).value == "junk"
    r = CliRunner().invoke(cli, ["review", "import", str(xlsx), "--corrections", str(tmp_path / "store")])
    assert r.exit_code == 0 and "no corrections" in r.output  # the untouched sheet stores nothing


def test_review_import_refuses_bombs_and_bad_files_with_one_line(tmp_path):
    import zipfile

    out = _shop_run(tmp_path)
    xlsx = tmp_path / "r.xlsx"
    assert CliRunner().invoke(cli, ["review", "export", str(out), "--out", str(xlsx), "--threshold", "1"]).exit_code == 0
    # a sheet whose <dimension> claims the whole grid
    bomb = tmp_path / "bomb.xlsx"
    with zipfile.ZipFile(xlsx) as zin, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename == "xl/worksheets/sheet1.xml":
                import re

                data = re.sub(rb'<dimension ref="[^"]+"', b'<dimension ref="A1:XFD1048576"', data)
                data = data.replace(b"</sheetData>", b'<row r="1048000"><c r="A1048000" t="inlineStr"><is><t>x</t></is></c></row></sheetData>')
            zout.writestr(item, data)
    with deadline(30):
        r = CliRunner().invoke(cli, ["review", "import", str(bomb), "--corrections", str(tmp_path / "s")])
    assert r.exit_code == 2 and "refused" in r.output and "Traceback" not in r.output
    (tmp_path / "notzip.xlsx").write_text("hello")
    r = CliRunner().invoke(cli, ["review", "import", str(tmp_path / "notzip.xlsx"), "--run", str(out)])
    assert r.exit_code == 2 and "not a readable xlsx" in r.output
    csv_path = tmp_path / "r.csv"
    assert CliRunner().invoke(cli, ["review", "export", str(out), "--out", str(csv_path), "--threshold", "1"]).exit_code == 0
    (tmp_path / "cp1252.csv").write_bytes(csv_path.read_text(encoding="utf-8-sig").replace("S1", "S\u00e9").encode("cp1252"))
    r = CliRunner().invoke(cli, ["review", "import", str(tmp_path / "cp1252.csv"), "--run", str(out)])
    assert r.exit_code == 2 and "UTF-8" in r.output


def test_a_sku_starting_with_quote_equals_round_trips_through_csv(tmp_path):
    out = _shop_run(tmp_path, cells=("'=A1", "a.jpg", "tops"))
    csv_path = tmp_path / "r.csv"
    assert CliRunner().invoke(cli, ["review", "export", str(out), "--out", str(csv_path), "--threshold", "1"]).exit_code == 0
    r = CliRunner().invoke(cli, ["review", "import", str(csv_path), "--corrections", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("field,value", [("temperature", 0), ("temperature", -1), ("temperature", "hot"),
                                         ("preprocess", {"name": "magic", "size": 224}), ("classes", 10),
                                         ("recommended_threshold", "0.5"), ("classes", ["a", "A"])])
def test_model_card_fields_are_validated_on_load(tmp_path, field, value):
    import json

    folder = tmp_path / "m"
    folder.mkdir()
    card = {"name": "m", "classes": ["a", "b"], "preprocess": {"name": "center_crop", "size": 224, "resize_short": 256},
            "arch": "x", "temperature": 1.0, field: value}
    (folder / "card.json").write_text(json.dumps(card))
    (folder / "model.keras").write_bytes(b"")
    product_photo(seed=1).save(tmp_path / "a.jpg")
    r = CliRunner().invoke(cli, ["run", str(tmp_path / "a.jpg").rsplit("/", 1)[0], "-o", str(tmp_path / "o.parquet"),
                                 "--model", str(folder), "-q"])
    assert r.exit_code == 2 and f"field '{field}'" in r.output, r.output


def test_output_paths_are_checked_before_work(tmp_path):
    out = _shop_run(tmp_path)
    r = CliRunner().invoke(cli, ["run", str(tmp_path / "m.csv"), "-o", str(tmp_path / "labels.csv"), "--model", "tiny_test"])
    assert r.exit_code == 2 and ".parquet" in r.output
    (tmp_path / "m.parquet").write_bytes((tmp_path / "m.csv").read_bytes())
    r = CliRunner().invoke(cli, ["run", str(tmp_path / "m.parquet"), "-o", str(tmp_path / "m.parquet"), "--model", "tiny_test"])
    assert r.exit_code == 2 and "input itself" in r.output
    log = tmp_path / "new" / "deeper" / "labelcat.log"
    r = CliRunner().invoke(cli, ["run", str(tmp_path / "m.csv"), "-o", str(out), "--log-file", str(log), "--model",
                                 "tiny_test", "-q", "--summary-json", str(tmp_path / "s" / "summary.json")])
    assert r.exit_code == 0 and log.is_file() and (tmp_path / "s" / "summary.json").is_file()


def test_a_review_threshold_of_zero_is_kept(tmp_path):
    import json

    product_photo(seed=1).save(tmp_path / "a.jpg")
    out = tmp_path / "o.parquet"
    r = CliRunner().invoke(cli, ["run", str(tmp_path / "a.jpg").rsplit("/", 1)[0], "-o", str(out), "--model",
                                 "tiny_test", "-q", "--review-threshold", "0"])
    assert r.exit_code == 0
    meta = json.loads(pq.read_schema(out).metadata[b"labelcat.run"])
    assert meta["review_threshold"] == 0


def test_temporaries_of_a_killed_writer_are_swept(tmp_path):
    from pipeline.ops.fsutil import atomic_path

    dest = tmp_path / "labels.parquet"
    dead = tmp_path / ".labels.parquet.999999999.abc.tmp.parquet"
    dead.write_bytes(b"half")
    live = tmp_path / f".labels.parquet.{os.getpid()}.xyz.tmp.parquet"
    live.write_bytes(b"mine, still writing")
    foreign = tmp_path / ".labels.parquet.notes"
    foreign.write_text("not ours")
    with atomic_path(dest, suffix=".parquet") as tmp:
        tmp.write_bytes(b"new")
    assert not dead.exists() and live.exists() and foreign.exists() and dest.read_bytes() == b"new"


def test_one_bad_manifest_row_is_an_error_row_not_a_failed_night(tmp_path):
    """A Latin-1 byte after the first 64 KB and a 200 KB cell: their rows are errors, the rest is labelled."""
    product_photo(seed=1).save(tmp_path / "a.jpg")
    good = b"S%d,a.jpg," + b"x" * 100 + b"\n"
    body = b"".join(good % i for i in range(700))  # > 64 KB before the bad rows
    body += b"BAD1,a.jpg,caf\xe9 au lait\n" + b"BAD2,a.jpg," + b"y" * 200_000 + b"\n" + good % 999
    (tmp_path / "m.csv").write_bytes(b"sku,path,note\n" + body)
    out = tmp_path / "o.parquet"
    r = CliRunner().invoke(cli, ["run", str(tmp_path / "m.csv"), "-o", str(out), "--model", "tiny_test", "-q",
                                 "--chunk-size", "256", "--store", str(tmp_path / "st")])
    assert r.exit_code == 0, r.output
    rows = pq.read_table(out).to_pandas().set_index("sku")
    assert len(rows) == 703
    assert rows.loc["BAD1", "error"] == "malformed_row" and "not UTF-8" in rows.loc["BAD1", "error_detail"]
    assert rows.loc["BAD2", "error"] == "malformed_row" and "200000 characters" in rows.loc["BAD2", "error_detail"]
    assert rows.loc["BAD1", "note"] == "caf\\xe9 au lait"  # kept, escaped
    assert rows.loc["S999", "status"] != "error"


def test_folder_symlinks_that_leave_the_folder_follow_the_manifest_rule(tmp_path):
    from pipeline.stages.ingest import ingest

    (tmp_path / "in").mkdir()
    product_photo(seed=1).save(tmp_path / "secret.jpg")
    product_photo(seed=2).save(tmp_path / "in" / "a.jpg")
    (tmp_path / "in" / "link.jpg").symlink_to(tmp_path / "secret.jpg")
    (tmp_path / "in" / "inside.jpg").symlink_to(tmp_path / "in" / "a.jpg")
    errors = {r.path.rsplit("/", 1)[1]: r.error for r in ingest(tmp_path / "in").records}
    assert errors["link.jpg"][0] == "outside_manifest" and errors["inside.jpg"] is None and errors["a.jpg"] is None
    assert all(r.error is None for r in ingest(tmp_path / "in", allow_outside=True).records)


def test_a_locked_store_is_reported_before_the_model_loads(tmp_path, monkeypatch):
    from pipeline import cli as cli_mod
    from pipeline.ops.store import Store

    product_photo(seed=1).save(tmp_path / "a.jpg")
    loaded = []
    monkeypatch.setattr(cli_mod, "_load_classifier", lambda *a: loaded.append(a))
    with Store(tmp_path / "st").lock():
        r = CliRunner().invoke(cli, ["run", str(tmp_path), "-o", str(tmp_path / "o.parquet"), "--store",
                                     str(tmp_path / "st"), "--model", "tiny_test", "-q"])
    assert r.exit_code == 3 and "locked" in r.output and loaded == []


def test_many_chunks_trace_the_model_step_once(tmp_path):
    """TensorFlow warns about retracing (in cron mail) when every chunk builds a new tf.function."""
    from conftest import tiny_test
    from pipeline.runners.local import RunConfig, run

    for i in range(7):
        product_photo(((i * 40) % 255, 90, 160), seed=i).save(tmp_path / f"p{i}.jpg")
    for engine in ("tensorflow", "xnnpack"):
        clf = tiny_test()
        run(tmp_path, tmp_path / "o.parquet", clf, RunConfig(chunk_size=1, quiet=True, engine=engine))
        # one TensorFlow step, traced once; the XNNPACK engine is converted from one (traced once), or loaded
        # from the cache without building any
        tf_steps = [step for key, step in clf.steps.items() if key != "xnnpack"]
        traces = [step.experimental_get_tracing_count() for step in tf_steps]
        if engine == "tensorflow":
            assert traces == [1] and len(clf.steps) == 1
        else:
            assert "xnnpack" in clf.steps and len(tf_steps) <= 1 and all(t <= 1 for t in traces)
