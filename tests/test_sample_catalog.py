"""The real default model on the shipped sample catalogue: the product's promise."""

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from conftest import SAMPLE
from pipeline.cli import cli

EXPECTED_LABELS = {
    "hoodies": "tops", "t-shirts": "tops", "polos": "tops", "sneakers": "footwear",
    "cushions": "home_textiles", "beer": "food_drink", "wine": "food_drink",
}


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample") / "labels.parquet"
    result = CliRunner().invoke(cli, ["run", str(SAMPLE / "manifest.csv"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return pq.read_table(out).to_pandas(), result.output


@pytest.mark.slow
def test_one_row_per_manifest_row_in_order(sample_run):
    t, output = sample_run
    manifest_rows = sum(1 for _ in open(SAMPLE / "manifest.csv", encoding="utf-8")) - 1
    assert list(t["row"]) == list(range(manifest_rows))
    assert "status: labelled" in output


@pytest.mark.slow
def test_every_row_gets_the_status_the_catalogue_expects(sample_run):
    t, _ = sample_run
    for _, r in t.iterrows():
        expected = r["expected"]
        want = ("duplicate" if "duplicate" in expected else "junk" if expected.startswith("junk")
                else "error" if expected.startswith("error") else "labelled")
        assert r["status"] == want, (r["path"], r["status"], r["junk_reason"], r["error"], expected)


@pytest.mark.slow
def test_real_products_are_labelled_sensibly(sample_run):
    t, _ = sample_run
    products = t[t["expected"] == "product"]
    for _, r in products.iterrows():
        folder = r["path"].split("/")[1]
        if folder in EXPECTED_LABELS:
            assert r["label"] == EXPECTED_LABELS[folder], (r["path"], r["label"], r["topk_labels"])
    assert t.loc[t["path"].str.endswith("espresso.jpg"), "label"].item() == "food_drink"


@pytest.mark.slow
def test_duplicates_point_at_the_right_originals(sample_run):
    t, _ = sample_run
    by_path = dict(zip(t["path"], t["row"]))
    dups = t[t["status"] == "duplicate"]
    for _, r in dups.iterrows():
        original = r["path"].replace("_copy", "").replace("_q60", "").replace("_small", "").replace("_crop", "").replace("_phone", "").replace("_sale", "")
        assert r["duplicate_of"] == by_path[original], r["path"]


@pytest.mark.slow
def test_the_folder_decides_what_the_photo_alone_cannot(sample_run, tmp_path):
    """Saleor's juice cartons look like lotion to ImageNet (beauty_health 0.58-0.74 alone); filed under juices
    they are food_drink, marked as the folder's decision and shown to a person. With --hint-trust 0 the photo
    alone decides again."""
    t, _ = sample_run
    juices = t[t["path"].str.startswith("images/juices/fd_juice_0") & (t["status"] == "labelled")]
    assert len(juices) == 5
    assert (juices["label"] == "food_drink").all() and (juices["label_source"] == "hint").all()
    assert juices["needs_review"].all()
    assert juices["review_reason"].str.startswith("hint_decided: filed as food_drink; the photo alone says beauty_health").all()
    kept = t[(t["status"] == "labelled") & (t["label_source"] == "model")]
    assert not kept["review_reason"].fillna("").str.startswith("hint_decided").any()

    out = tmp_path / "alone.parquet"
    r = CliRunner().invoke(cli, ["run", str(SAMPLE / "images" / "juices"), "--out", str(out), "--hint-trust", "0",
                                 "--quiet"])
    assert r.exit_code == 0, r.output
    alone = pq.read_table(out).to_pandas()
    alone = alone[alone["path"].str.contains("fd_juice_0") & (alone["status"] == "labelled")]
    assert len(alone) == 5
    assert (alone["label"] == "beauty_health").all() and (alone["label_source"] == "model").all()
    assert alone["review_reason"].str.startswith("hint_mismatch: filed as food_drink, model says beauty_health").all()
