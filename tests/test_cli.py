"""The command line, driven as a user would, through click's CliRunner."""

import json
import os
import re
import subprocess
import sys

import click
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import REPO, product_photo
from pipeline.cli import cli


def _commands(group: click.Group, prefix=()):
    for name, cmd in group.commands.items():
        yield (*prefix, name), cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*prefix, name))


def test_every_command_has_help_and_is_in_the_readme():
    readme = (REPO / "README.md").read_text()
    runner = CliRunner()
    for path, cmd in _commands(cli):
        result = runner.invoke(cli, [*path, "--help"])
        assert result.exit_code == 0, result.output
        assert cmd.help and cmd.help.strip(), f"{' '.join(path)} has no docstring"
        assert f"labelcat {' '.join(path)}" in readme, f"`labelcat {' '.join(path)}` missing from README"
        if not isinstance(cmd, click.Group):
            for param in cmd.params:
                if isinstance(param, click.Option) and param.name != "help":
                    assert param.help, f"{' '.join(path)} {param.opts[0]} has no help"
                    assert param.opts[0] in readme, f"{param.opts[0]} of {' '.join(path)} not in README"


@pytest.fixture()
def shop(tmp_path):
    """A small shop night: products, a copy, a near copy, junk and broken files."""
    img = tmp_path / "img"
    for folder in ("tops", "bags"):
        (img / folder).mkdir(parents=True)
    product_photo((200, 30, 30), seed=1).save(img / "tops/red.jpg", quality=90)
    product_photo((20, 150, 140), seed=1).save(img / "tops/teal.jpg", quality=90)  # colour variant
    product_photo((200, 30, 30), seed=1).save(img / "tops/red_small.jpg", quality=70)  # near duplicate
    (img / "tops/red_copy.jpg").write_bytes((img / "tops/red.jpg").read_bytes())  # exact duplicate
    product_photo((90, 60, 30), shape="bag", seed=3).save(img / "bags/bag.png")
    Image.new("RGB", (300, 300), "white").save(img / "bags/blank.png")
    (img / "bags/empty.jpg").write_bytes(b"")
    (img / "bags/notes.jpg").write_text("not a photo")
    manifest = tmp_path / "manifest.csv"
    rows = ["sku,path,category_hint,price", "S1,img/tops/red.jpg,tops,10", "S2,img/tops/teal.jpg,tops,10",
            "S3,img/tops/red_small.jpg,tops,10", "S4,img/tops/red_copy.jpg,tops,10", "S5,img/bags/bag.png,bags,=1+1",
            "S6,img/bags/blank.png,bags,", "S7,img/bags/empty.jpg,bags,", "S8,img/bags/notes.jpg,bags,",
            "S9,img/bags/gone.jpg,bags,"]
    manifest.write_text("\n".join(rows) + "\n")
    return tmp_path


def _run(*args):
    return CliRunner().invoke(cli, ["run", *args, "--model", "tiny_test", "--quiet"], catch_exceptions=False)


def test_run_end_to_end_on_a_manifest(shop):
    out = shop / "out/labels.parquet"
    summary = shop / "summary.json"
    result = _run(str(shop / "manifest.csv"), "--out", str(out), "--summary-json", str(summary))
    assert result.exit_code == 0, result.output
    assert result.output == ""  # --quiet prints nothing
    t = pq.read_table(out).to_pandas()
    assert list(t["row"]) == list(range(9)) and list(t["sku"]) == [f"S{i}" for i in range(1, 10)]
    status = dict(zip(t["sku"], t["status"]))
    assert status["S1"] in ("labelled", "junk") and status["S2"] in ("labelled", "junk")
    assert (status["S3"], status["S4"]) == ("duplicate", "duplicate")
    dup = t.set_index("sku")
    assert dup.loc["S3", "duplicate_of"] == 0 and dup.loc["S4", "duplicate_of"] == 0
    assert dup.loc["S4", "duplicate_kind"] == "exact" and dup.loc["S3", "duplicate_kind"] == "near"
    assert dup.loc["S3", "label"] == dup.loc["S1", "label"]  # inherited, not re-classified
    assert status["S6"] == "junk" and dup.loc["S6", "junk_reason"].startswith("near_blank")
    assert [dup.loc[s, "error"] for s in ("S7", "S8", "S9")] == ["empty", "not_an_image", "missing"]
    assert dup.loc["S5", "price"] == "=1+1"  # pass-through untouched
    assert dup.loc["S1", "sha256"] == dup.loc["S4", "sha256"]
    assert len(dup.loc["S1", "topk_labels"]) == 3 and dup.loc["S1", "model"] == "tiny_test"
    s = json.loads(summary.read_text())
    assert s["rows"] == 9 and s["by_status"]["duplicate"] == 2 and s["errors"]["missing"] == 1
    assert s["out"] == str(out)


def test_run_on_a_folder_prints_a_summary(shop):
    out = shop / "folder.parquet"
    result = CliRunner().invoke(cli, ["run", str(shop / "img"), "--out", str(out), "--model", "tiny_test"])
    assert result.exit_code == 0, result.output
    assert "status: labelled" in result.output and str(out) in result.output
    t = pq.read_table(out).to_pandas()
    assert len(t) == 8 and set(t["category_hint"]) == {"tops", "bags"}


def test_a_failed_run_keeps_the_previous_output(shop, monkeypatch):
    out = shop / "labels.parquet"
    assert _run(str(shop / "manifest.csv"), "--out", str(out)).exit_code == 0
    before = out.read_bytes()

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pyarrow.parquet.ParquetWriter.write_table", disk_full)
    result = _run(str(shop / "manifest.csv"), "--out", str(out))
    assert result.exit_code == 1 and "No space left" in result.output
    assert out.read_bytes() == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "NOPE.csv"], "does not exist"),
        (["run", "{bad}"], "no path column"),
        (["run", "{empty}"], "is empty"),
        (["run", "{ok}", "--batch-size", "0"], "batch-size"),
        (["run", "{ok}", "--model", "nope"], "nope"),
        (["run", "{ok}", "--taxonomy", "{bad}"], "not valid JSON"),
    ],
)
def test_usage_errors_exit_2_with_one_clear_line(tmp_path, args, message):
    (tmp_path / "bad.csv").write_text("sku,title\nA,B\n")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "ok.csv").write_text("path\nx.jpg\n")
    files = {k: str(tmp_path / f"{k}.csv") for k in ("bad", "empty", "ok")}
    result = CliRunner().invoke(cli, [a.format(**files) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_models_list():
    result = CliRunner().invoke(cli, ["models", "list"])
    assert result.exit_code == 0
    assert re.search(r"efficientnet_lite0\s+Zero-shot", result.output)
    assert "mobilenet_v2" in result.output


def test_odd_file_names_survive_a_run(tmp_path):
    """Non-UTF-8 bytes, unicode and spaces in names: read through the real name, stored as text."""
    shop = tmp_path / "shop" / "tops"
    shop.mkdir(parents=True)
    product_photo(seed=1).save(os.fsdecode(os.fsencode(shop) + b"/caf\xe9.jpg"), format="JPEG")
    product_photo((20, 150, 140), seed=2).save(shop / "ünïcødé file (2).jpg")
    out = tmp_path / "o.parquet"
    r = CliRunner().invoke(cli, ["run", str(tmp_path / "shop"), "--out", str(out), "--model", "tiny_test", "--quiet"])
    assert r.exit_code == 0, r.output
    t = pq.read_table(out).to_pandas()
    assert sorted(p.rsplit("/", 1)[1] for p in t.path) == ["caf\\xe9.jpg", "ünïcødé file (2).jpg"]
    assert set(t.status) <= {"labelled", "junk"}  # both decoded: nothing lost to the odd names


def test_dedupe_and_junk_options_reach_their_configs():
    """Each option lands in the field of its name (a positional build once put --color-threshold's value in
    another field), and the rest keep their defaults."""
    from pipeline.cli import dedupe_options, junk_options
    from pipeline.stages.dedupe import DedupeConfig
    from pipeline.stages.junk import JunkConfig

    seen = {}

    @click.command()
    @dedupe_options
    @junk_options
    def probe(dedupe, junk):
        seen.update(dedupe=dedupe, junk=junk)

    r = CliRunner().invoke(probe, ["--phash-threshold", "7", "--fine-threshold", "30", "--color-threshold", "4.5",
                                   "--copy-similarity", "0.9", "--min-size", "80", "--not-product-threshold", "0.6", "--mismatch-confidence", "0.9",
                                   "--hint-trust", "0.5"])
    assert r.exit_code == 0, r.output
    assert seen["dedupe"] == DedupeConfig(phash_threshold=7, fine_threshold=30, color_threshold=4.5,
                                          embedding_similarity=0.9)
    assert seen["junk"] == JunkConfig(min_side=80, not_product=0.6, mismatch_confidence=0.9, hint_trust=0.5)
    CliRunner().invoke(probe, [])
    assert seen["dedupe"] == DedupeConfig() and seen["junk"] == JunkConfig()


def test_the_cli_gives_tensorflow_its_pooling_allocator_unless_told_otherwise():
    """Without TensorFlow's BFC allocator each batch's activations were mapped and zeroed afresh (a third of
    a run's CPU time in the kernel, README "Session 14: page faults"); a value the user set stays."""
    code = "import os; import pipeline.cli; print(os.environ['TF_CPU_ALLOCATOR_USE_BFC'])"
    env = {k: v for k, v in os.environ.items() if k != "TF_CPU_ALLOCATOR_USE_BFC"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=REPO).stdout.strip() == "true"
    assert subprocess.run([sys.executable, "-c", code], env=env | {"TF_CPU_ALLOCATOR_USE_BFC": "false"},
                          capture_output=True, text=True, cwd=REPO).stdout.strip() == "false"
