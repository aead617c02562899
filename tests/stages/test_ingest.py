import os
from pathlib import Path

import pytest

from pipeline.stages.ingest import Containment, IngestError, ingest


def _manifest(tmp_path, text, name="m.csv", encoding="utf-8"):
    p = tmp_path / name
    p.write_bytes(text.encode(encoding))
    return p


def test_manifest_bom_quotes_newlines_and_pass_through(tmp_path):
    (tmp_path / "img").mkdir()
    p = _manifest(tmp_path, '\ufeffSKU,Path,category_hint,title,status\r\n'
                            'A1,img/a.jpg,tv,"Big TV, 55""",new\r\n'
                            'A2,img/b.jpg,,"two\nlines",\r\n', encoding="utf-8")
    batch = ingest(p)
    assert batch.source == "manifest"
    # "status" collides with an output column, so it is carried as input_status
    assert batch.extra_columns == ["title", "input_status"]
    a, b = list(batch.records)
    assert (a.row, a.sku, a.path, a.category_hint) == (0, "A1", "img/a.jpg", "tv")
    assert a.resolved == tmp_path / "img/a.jpg"
    assert a.extra == {"title": 'Big TV, 55"', "input_status": "new"}
    assert b.category_hint is None and b.extra["title"] == "two\nlines"


def test_image_and_id_columns_semicolons_and_row_problems(tmp_path):
    p = _manifest(tmp_path, "id;image\nX;a.jpg\nY;\n\nZ;c.jpg;extra\n")
    recs = list(ingest(p).records)
    assert [r.sku for r in recs] == ["X", "Y", "Z"]  # the blank line is not a row
    assert recs[0].error is None
    assert recs[1].error[0] == "no_path"
    assert recs[2].error[0] == "malformed_row"


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"sku,title\nA,b\n", "no path column"),
        (b"path\n", "no rows"),
        (b"\x89PNG\r\n\x1a\n\x00\x00binary", "not a CSV"),
        (b"path\n\xff\xfe\xfa.jpg\nabc\n", "not UTF-8"),
        (b"path,Path\na,b\n", "repeats"),
    ],
)
def test_unusable_manifests_are_usage_errors(tmp_path, content, message):
    p = tmp_path / "m.csv"
    p.write_bytes(content)
    with pytest.raises(IngestError, match=message):
        ingest(p)


def test_directory_walk_hints_and_order(tmp_path):
    for rel in ["tv/b.jpg", "tv/a.jpg", "sofas/x.png", ".hidden/y.jpg", "tv/.DS_Store", "notes.txt"]:
        f = tmp_path / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x")
    (tmp_path / "loop").symlink_to(tmp_path)  # a symlink loop must not hang the walk
    recs = list(ingest(tmp_path).records)
    assert [r.path.replace(str(tmp_path) + "/", "") for r in recs] == ["notes.txt", "sofas/x.png", "tv/a.jpg", "tv/b.jpg"]
    assert [r.category_hint for r in recs][1:] == ["sofas", "tv", "tv"]
    assert [r.row for r in recs] == [0, 1, 2, 3]


def test_missing_input_is_a_usage_error(tmp_path):
    with pytest.raises(IngestError, match="does not exist"):
        ingest(tmp_path / "nope.csv")


def test_containment_with_its_folder_cache_agrees_with_resolving_every_path(tmp_path):
    """The cached check must say what resolving the whole path says for every path, symlinks and ``..``
    included; a symlink loop is just outside-or-not, never an exception (``Path.resolve()`` raised on it)."""
    base, outside = tmp_path / "shop", tmp_path / "elsewhere"
    (base / "img" / "deep").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(b"x")
    (base / "img" / "a.jpg").write_bytes(b"x")
    (base / "out_dir").symlink_to(outside)  # a folder link that leaves
    (base / "img" / "in_dir").symlink_to(base / "img" / "deep")  # one that stays
    (base / "img" / "leak.jpg").symlink_to(outside / "secret.jpg")  # a file link that leaves
    (base / "img" / "ok.jpg").symlink_to(base / "img" / "a.jpg")
    (base / "loop").symlink_to(base / "loop")
    names = ["img/a.jpg", "img/ok.jpg", "img/leak.jpg", "out_dir/secret.jpg", "out_dir/../shop/img/a.jpg",
             "img/in_dir/../a.jpg", "img/in_dir/x.jpg", "img/../../elsewhere/secret.jpg", "img/missing.jpg",
             "out_dir/missing.jpg", "img/deep/..", "img/.", "..", "loop", "img/deep/../../img/a.jpg", str(outside / "s.jpg"),
             str(base / "img" / "a.jpg")]
    inside = Containment(base)
    real_base = Path(os.path.realpath(base))
    for name in names * 2:  # twice: the second pass answers from the folder cache
        path = base / name
        expected = Path(os.path.realpath(path)).is_relative_to(real_base)
        assert inside(path) == expected, name
    assert not inside(base / "img" / "leak.jpg") and not inside(base / "out_dir" / "secret.jpg")
    assert inside(base / "img" / "in_dir" / "x.jpg")
