"""The real default model on the shipped sample catalogue: the product's promise."""

import json

import numpy as np
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
def test_the_shops_categories_and_its_folder_decide_what_the_photo_alone_cannot(sample_run, tmp_path):
    """Saleor's juice cartons look like lotion to ImageNet (beauty_health 0.58-0.74 of all 29 categories).
    The catalogue sells no beauty products (its folders file tops, footwear, cushions, paints and drinks), so
    among what it sells the photo itself says food_drink. Without that (``--catalogue all``) the folder
    decides, marked as its decision and shown to a person; with --hint-trust 0 as well, the photo alone
    decides again."""
    t, _ = sample_run
    juices = t[t["path"].str.startswith("images/juices/fd_juice_0") & (t["status"] == "labelled")]
    assert len(juices) == 5
    assert (juices["label"] == "food_drink").all() and (juices["label_source"] == "model").all()
    assert not juices["needs_review"].any()

    def juices_with(*options: str):
        out = tmp_path / "juices.parquet"
        r = CliRunner().invoke(cli, ["run", str(SAMPLE / "manifest.csv"), "--out", str(out), "--quiet", *options])
        assert r.exit_code == 0, r.output
        rows = pq.read_table(out).to_pandas()
        return rows, rows[rows["path"].str.contains("fd_juice_0") & (rows["status"] == "labelled")]

    every, juices = juices_with("--catalogue", "all")
    assert len(juices) == 5
    assert (juices["label"] == "food_drink").all() and (juices["label_source"] == "hint").all()
    assert juices["needs_review"].all()
    assert juices["review_reason"].str.startswith("hint_decided: filed as food_drink; the photo alone says beauty_health").all()
    kept = every[(every["status"] == "labelled") & (every["label_source"] == "model")]
    assert not kept["review_reason"].fillna("").str.startswith("hint_decided").any()
    assert (every["status"] == t["status"]).all()  # the same rows kept, junked and merged either way

    _, alone = juices_with("--catalogue", "all", "--hint-trust", "0")
    assert len(alone) == 5
    assert (alone["label"] == "beauty_health").all() and (alone["label_source"] == "model").all()
    assert alone["review_reason"].str.startswith("hint_mismatch: filed as food_drink, model says beauty_health").all()


@pytest.mark.slow
def test_a_named_catalogue_junks_what_the_shop_does_not_sell(tmp_path):
    """``--catalogue cushions`` (a folder name the taxonomy maps to home_textiles): the misfiled sneaker among the
    cushions is ``not_sold`` (footwear 0.89, the shop's one category under the hint floor); the cushions stay
    labelled. A name that is no category is a usage error before anything is written."""
    night = tmp_path / "night" / "cushions"
    night.mkdir(parents=True)
    for f in ("cushions/cuschion01.jpg", "cushions/cuschion02.jpg", "hoodies/sneakers_misfiled.jpg"):
        (night / f.split("/")[1]).write_bytes((SAMPLE / "images" / f).read_bytes())
    out = tmp_path / "o.parquet"
    r = CliRunner().invoke(cli, ["run", str(night.parent), "--out", str(out), "--quiet", "--catalogue", "cushions"])
    assert r.exit_code == 0, r.output
    t = pq.read_table(out).to_pandas().set_index("path")
    sneaker = t.loc[t.index.str.endswith("sneakers_misfiled.jpg")].iloc[0]
    assert sneaker["status"] == "junk" and sneaker["junk_reason"].startswith("not_sold: looks like footwear"), sneaker["junk_reason"]
    cushions = t[t.index.str.contains("cuschion")]
    assert (cushions["status"] == "labelled").all() and (cushions["label"] == "home_textiles").all()
    bad = tmp_path / "bad.parquet"
    r = CliRunner().invoke(cli, ["run", str(night.parent), "--out", str(bad), "--quiet", "--catalogue", "cushions,spaceships"])
    assert r.exit_code == 2 and "spaceships is not a category" in r.output and not bad.exists()
    r = CliRunner().invoke(cli, ["run", str(night.parent), "--out", str(bad), "--quiet", "--catalogue", " , "])
    assert r.exit_code == 2 and "--catalogue names no category" in r.output and not bad.exists()


@pytest.mark.slow
def test_a_shop_files_what_it_does_not_sell_under_its_department(tmp_path):
    """A shop of furniture and t-shirts files its cushions under furniture: the cushions (home_textiles 0.99,
    which the shop does not sell) are labelled furniture, kept, and shown to a person once (``folded``), not
    junked ``not_sold``. A juice carton in that folder (lotion to ImageNet: beauty_health 0.74, the shop's
    categories 0.006 together) is ``not_sold``, and so is the misfiled sneaker: the shop sells fashion
    (t-shirts), but did not file it there."""
    night = tmp_path / "night"
    for folder, files in {"furniture": ["cushions/cuschion01.jpg", "cushions/cuschion02.jpg", "juices/fd_juice_01.jpg",
                                        "hoodies/sneakers_misfiled.jpg"],
                          "t-shirts": ["t-shirts/cl_boot01_1.jpg", "t-shirts/cl_boot03_1.jpg"]}.items():
        (night / folder).mkdir(parents=True)
        for f in files:
            (night / folder / f.split("/")[1]).write_bytes((SAMPLE / "images" / f).read_bytes())
    out = tmp_path / "o.parquet"
    r = CliRunner().invoke(cli, ["run", str(night), "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    t = pq.read_table(out).to_pandas()
    t.index = t["path"].str.rsplit("/", n=1).str[-1]
    cushions = t.loc[["cuschion01.jpg", "cuschion02.jpg"]]
    assert (cushions["status"] == "labelled").all() and (cushions["label"] == "furniture").all()
    assert cushions["review_reason"].str.startswith("folded: looks like home_textiles (0.9").all(), cushions["review_reason"]
    assert t.loc["fd_juice_01.jpg", "junk_reason"].startswith("not_sold: looks like beauty_health")
    assert t.loc["sneakers_misfiled.jpg", "junk_reason"].startswith("not_sold: looks like footwear")
    assert (t.loc[["cl_boot01_1.jpg", "cl_boot03_1.jpg"], "label"] == "tops").all()


@pytest.mark.slow
def test_the_catalogue_remembers_what_earlier_nights_filed(tmp_path):
    """``--catalogue auto`` needs two categories: a night of one folder alone says nothing of what else the
    shop sells, so its juice cartons (lotion to ImageNet) are labelled by their folder and shown to a person.
    With ``--store``, the folders of earlier nights count too: after a night of hoodies and juices, the next
    night's lone juice folder is read among tops and drinks, and the photos say food_drink themselves."""
    def night(name: str, files: list[str]):
        for f in files:
            (tmp_path / name / f.split("/")[0]).mkdir(parents=True, exist_ok=True)
            (tmp_path / name / f).write_bytes((SAMPLE / "images" / f).read_bytes())
        return tmp_path / name

    first = night("first", ["hoodies/cl_bogo01_1.jpg", "juices/fd_juice_01.jpg"])
    second = night("second", ["juices/fd_juice_03.jpg", "juices/fd_juice_05.jpg"])

    def juices(source, *options):
        out = tmp_path / f"{source.name}{len(options)}.parquet"
        r = CliRunner().invoke(cli, ["run", str(source), "--out", str(out), "--quiet", "--log-file",
                                     str(tmp_path / "log.jsonl"), *options])
        assert r.exit_code == 0, r.output
        t = pq.read_table(out).to_pandas()
        return t[t["path"].str.contains("fd_juice_0[35]")]

    alone = juices(second)
    assert (alone["label"] == "food_drink").all() and (alone["label_source"] == "hint").all() and alone["needs_review"].all()
    store = ["--store", str(tmp_path / "store")]
    juices(first, *store)
    remembered = juices(second, *store)
    assert len(remembered) == 2 and (remembered["status"] == "labelled").all()
    assert (remembered["label"] == "food_drink").all() and (remembered["label_source"] == "model").all()
    assert not remembered["needs_review"].any()
    import json

    events = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    catalogues = [e.get("catalogue") for e in events if e["stage"] == "classify"]
    assert catalogues == [None, ["tops", "food_drink"], ["tops", "food_drink"]]


@pytest.mark.slow
def test_evaluate_scores_the_labels_a_run_gives(tmp_path):
    """``labelcat evaluate`` reads the default model among the categories DATA is labelled with, as a run reads
    it among the categories its photos are filed under: the juice cartons ImageNet calls lotion are food_drink
    in a shop of drinks and t-shirts (the report names that catalogue), beauty_health with ``--catalogue all``.
    A name that is no category is a usage error, as for ``run``."""
    data = tmp_path / "labelled"
    for folder, names in (("juices", ("fd_juice_01", "fd_juice_02", "fd_juice_03")),
                          ("t-shirts", ("cl_boot01_1", "cl_boot03_1", "cl_boot07_1"))):
        (data / folder).mkdir(parents=True)
        for name in names:
            (data / folder / f"{name}.jpg").write_bytes((SAMPLE / "images" / folder / f"{name}.jpg").read_bytes())

    def report(catalogue: str) -> dict:
        rep = tmp_path / f"rep-{catalogue}"
        r = CliRunner().invoke(cli, ["evaluate", "efficientnet_lite0", str(data), "--report", str(rep),
                                     "--catalogue", catalogue])
        assert r.exit_code == 0, r.output
        return json.loads((rep / "report.json").read_text()), r.output

    shop, output = report("auto")
    assert shop["catalogue"] == ["tops", "food_drink"] and "catalogue: tops, food_drink" in output
    assert shop["per_class"]["food_drink"]["recall"] == 1.0 and shop["accuracy"] == 1.0
    # as a run labels a night of them without folders: each photo voted on by its 5 most alike others
    assert shop["neighbours"] == 5 and shop["photo_alone_accuracy"] == 1.0 and "the photo alone: accuracy 1.0000" in output
    every, _ = report("all")
    assert every["catalogue"] is None
    assert every["per_class"]["food_drink"]["recall"] == 0.0 and every["per_class"]["beauty_health"]["support"] == 0
    r = CliRunner().invoke(cli, ["evaluate", "efficientnet_lite0", str(data), "--report", str(tmp_path / "x"),
                                 "--catalogue", "tops,spaceships"])
    assert r.exit_code == 2 and "spaceships is not a category" in r.output and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_a_folder_whose_name_is_no_category_of_its_photos_is_no_hint(tmp_path):
    """Photos uploaded to a folder called ``home`` (an alias of home_decor): the model confidently places 6 of
    the 7 elsewhere, so the folder's name names no category of them. They are labelled from the photo
    alone (shirts as tops, the cushion as home_textiles) instead of junked as contradictions of home_decor,
    the Parquet keeps the folder name but no hint category, and the terminal hears of it."""
    home = tmp_path / "home"
    home.mkdir()
    for f in ("hoodies/cl_bogo01_1", "t-shirts/cl_boot01_1", "t-shirts/cl_boot03_1", "cushions/cuschion01",
              "sneakers/sneakers_01_1", "sneakers/sneakers_02_3", "wine/wine-red"):
        (home / f"{f.split('/')[1]}.jpg").write_bytes((SAMPLE / "images" / f"{f}.jpg").read_bytes())
    out = tmp_path / "o.parquet"
    r = CliRunner().invoke(cli, ["run", str(home), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "filed under 'home' confidently show another category than home_decor" in r.output
    t = pq.read_table(out).to_pandas().set_index("path")
    assert (t["status"] == "labelled").all() and (t["category_hint"] == "home").all() and t["hint_category"].isna().all()
    label = {p.rsplit("/", 1)[1]: v for p, v in t["label"].items()}
    assert label["cl_bogo01_1.jpg"] == label["cl_boot01_1.jpg"] == "tops" and label["cuschion01.jpg"] == "home_textiles"
    assert label["wine-red.jpg"] == "food_drink" and label["sneakers_02_3.jpg"] == "footwear"


@pytest.mark.slow
def test_photos_without_a_folder_are_labelled_with_their_most_alike_photos_voting(tmp_path, real_classifier):
    """A night of photos in one folder that names no category: each photo's label is its own probabilities and
    its five most alike photos' votes (``embeddings.neighbour_votes``), not the photo alone; a row whose
    label the votes changed says so (``label_source = "neighbours"``, a ``neighbours_decided`` review note).
    The astronaut, alike to no product here, is no confident label for the votes to keep (under 0.6: review)."""
    from pipeline.models.embeddings import neighbour_votes
    from pipeline.stages.classify import predict

    names = ["hoodies/cl_bogo01_1.jpg", "hoodies/cl_bogo02_1.jpg", "hoodies/cl_bogo03_1.jpg", "t-shirts/cl_boot01_1.jpg",
             "t-shirts/cl_boot03_1.jpg", "sneakers/sneakers_01_1.jpg", "sneakers/sneakers_02_2.jpg",
             "cushions/cuschion01.jpg", "cushions/cuschion02.jpg", "juices/fd_juice_01.jpg", "juices/fd_juice_03.jpg",
             "t-shirts/astronaut.jpg"]
    night = tmp_path / "night"
    night.mkdir()
    for name in names:
        (night / name.replace("/", "__")).write_bytes((SAMPLE / "images" / name).read_bytes())
    out = tmp_path / "o.parquet"
    r = CliRunner().invoke(cli, ["run", str(night), "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    t = pq.read_table(out).to_pandas().sort_values("path").reset_index(drop=True)
    assert (t["status"] == "labelled").all() and t["hint_category"].isna().all()

    preds = predict(real_classifier, list(t["path"]))
    cats = real_classifier.categories
    votes = neighbour_votes(preds.probs, preds.embeddings)
    assert list(t["label"]) == [cats[int(v.argmax())] for v in votes]
    assert np.allclose(t["confidence"], votes.max(axis=1), atol=1e-4)
    changed = preds.probs.argmax(axis=1) != votes.argmax(axis=1)
    assert list(t["label_source"]) == ["neighbours" if c else "model" for c in changed]
    assert t.loc[changed, "review_reason"].str.startswith("neighbours_decided").all()
    astronaut = t[t["path"].str.endswith("astronaut.jpg")].iloc[0]
    assert preds.probs[astronaut.name].max() > 0.6 > astronaut["confidence"] and astronaut["needs_review"]
