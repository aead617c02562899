"""Few-shot shop models on real photos (Saleor products, scikit-image non-products): decisions a shop can trust."""

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from conftest import SAMPLE
from pipeline.cli import cli
from pipeline.learning.fewshot import class_outliers, fit, power_transform
from pipeline.models.embeddings import leave_one_out_similarity
from pipeline.models.card import read_card
from pipeline.stages.junk import HintReference, JunkConfig, Likeness, folder_likeness, folder_verdict, open_set_reason

#: Real product photos per class in sample_catalog (near copies and misfiled photos excluded).
PRODUCTS = {
    "hoodies": ["cl_bogo01_1", "cl_bogo02_1", "cl_bogo03_1", "cl_bogo04_1"],
    "juices": ["fd_juice_01", "fd_juice_02", "fd_juice_03", "fd_juice_05", "fd_juice_06"],
    "polos": ["cl_polo01", "cl_polo02", "cl_polo03-woman", "cl_polo04-woman"],
    "sneakers": ["sneakers_01_1", "sneakers_01_3", "sneakers_02_2", "sneakers_02_3"],
    "t-shirts": ["cl_boot01_1", "cl_boot03_1", "cl_boot06_1", "cl_boot07_1"],
}


@pytest.fixture(scope="module")
def few_shot(tmp_path_factory):
    """Three photos a class for training (plus the misfiled cat and astronaut), the rest held out."""
    base = tmp_path_factory.mktemp("fewshot")
    for cls, stems in PRODUCTS.items():
        (base / "train" / cls).mkdir(parents=True)
        (base / "test" / cls).mkdir(parents=True)
        for i, stem in enumerate(stems):
            shutil.copy(SAMPLE / "images" / cls / f"{stem}.jpg", base / ("train" if i < 3 else "test") / cls)
    shutil.copy(SAMPLE / "images" / "t-shirts" / "astronaut.jpg", base / "train" / "t-shirts")  # junk in the folder
    r = CliRunner().invoke(cli, ["train", str(base / "train"), "--out", str(base / "model")])
    assert r.exit_code == 0, r.output
    return base, r.output


@pytest.mark.slow
def test_few_shot_training_learns_the_shops_own_classes(few_shot):
    base, output = few_shot
    card = read_card(base / "model")
    assert card.arch.startswith("fewshot_") and card.training["method"] in ("centroid", "logreg")
    assert "astronaut.jpg" in output and "left out" in output  # the folder's junk is not trained on
    assert card.training["seconds"] < 60 and card.open_set and len(card.open_set["centroids"]) == 5
    r = CliRunner().invoke(cli, ["evaluate", str(base / "model"), str(base / "test"), "--report", str(base / "rep"), "-q"])
    assert r.exit_code == 0, r.output
    import json

    m = json.loads((base / "rep" / "report.json").read_text())
    assert m["n"] == 6 and m["accuracy"] >= 5 / 6  # a constant rule would get at most 2 of 6


@pytest.mark.slow
def test_a_trained_model_declines_what_does_not_belong(few_shot, tmp_path):
    base, _ = few_shot
    t = night_rows(tmp_path, base / "model", {  # a cat in the hoodie folder, coffee among t-shirts
        "hoodies": ["hoodies/cl_bogo04_1.jpg", "cushions/cat.jpg"],
        "t-shirts": ["juices/espresso.jpg", "t-shirts/cl_boot07_1.jpg"]})
    for junk in ("cat.jpg", "espresso.jpg"):
        assert t.loc[junk, "status"] == "junk", t.loc[junk].to_dict()
        assert t.loc[junk, "junk_reason"].startswith(("unknown", "hint_mismatch", "not_product"))
        assert bool(t.loc[junk, "needs_review"])
    for product, cls in (("cl_bogo04_1.jpg", "hoodies"), ("cl_boot07_1.jpg", "t-shirts")):
        assert t.loc[product, "status"] == "labelled" and t.loc[product, "label"] == cls
    # the frozen backbone's ImageNet output came with the model: the cat is an animal, the products are products
    assert t.loc["cat.jpg", "junk_reason"].startswith("not_product: looks like animal")
    assert "cat" in t.loc["cat.jpg", "imagenet_top"] and t.loc["cat.jpg", "product_evidence"] < 0.2
    assert t.loc["cl_bogo04_1.jpg", "product_evidence"] > 0.8 and t.loc["cl_boot07_1.jpg", "product_evidence"] > 0.8


def night_rows(tmp_path, model, filed: dict[str, list[str]]):
    """``labelcat run`` with ``model`` on a night's folder tree of sample_catalog photos (folder → files under
    ``images/``): the rows, indexed by file name."""
    night = tmp_path / "night"
    for folder, files in filed.items():
        (night / folder).mkdir(parents=True)
        for f in files:
            shutil.copy(SAMPLE / "images" / f, night / folder)
    out = tmp_path / "o.parquet"
    r = CliRunner().invoke(cli, ["run", str(night), "--model", str(model), "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    t = pq.read_table(out).to_pandas()
    return t.set_index(t.path.str.rsplit("/", n=1).str[1])


@pytest.mark.slow
def test_a_shop_model_keeps_its_backbones_imagenet_evidence(few_shot, tmp_path):
    """The second output is the backbone's own ImageNet head on the same pooled features: the shop model's
    ImageNet probabilities are the default model's, so non-products are junked by the same evidence; a card
    that says so over a one-output model is refused."""
    import json

    from pipeline.models.card import CARD_FILE, CardError, load_model
    from pipeline.models.classifier import load_classifier
    from pipeline.stages.classify import predict

    base, _ = few_shot
    card = read_card(base / "model")
    assert card.imagenet_evidence and card.imagenet_evidence["output"] == "imagenet"
    photos = [SAMPLE / "images" / "cushions" / "cat.jpg", SAMPLE / "images" / "hoodies" / "cl_bogo04_1.jpg",
              SAMPLE / "images" / "paints" / "rocket.jpg"]
    shop, default = load_classifier(str(base / "model"), precision="float32"), load_classifier("efficientnet_lite0",
                                                                                                 precision="float32")
    ours, theirs = predict(shop, photos), predict(default, photos)
    assert np.abs(ours.product_mass - theirs.product_mass).max() < 1e-4
    assert np.abs(ours.group_mass - theirs.group_mass).max() < 1e-4 and ours.imagenet_top == theirs.imagenet_top
    assert ours.probs.shape == (3, 5) and shop.groups == default.groups
    one = tmp_path / "one"
    shutil.copytree(base / "model", one)
    model, _ = load_model(one)
    from pipeline.models.classifier import to_mixed_precision

    mixed = to_mixed_precision(model)  # a GPU's: both outputs' layers stay float32, the trunk does not
    heads = ["logits", "imagenet"] + (["taxonomy_prior"] if card.training["taxonomy_prior"]["weight"] else [])
    assert [mixed.get_layer(n).dtype_policy.name for n in heads] == ["float32"] * len(heads)
    assert mixed.get_layer("unit").dtype_policy.name.startswith("mixed_")
    import keras

    keras.Model(model.inputs, model.outputs[0]).save(one / "model.keras")
    with pytest.raises(CardError, match="outputs"):
        load_model(one)
    doc = json.loads((one / CARD_FILE).read_text())
    doc["imagenet_evidence"] = None
    (one / CARD_FILE).write_text(json.dumps(doc))
    assert load_model(one)[0].outputs[0].shape[-1] == 5  # an older card: one output, no ImageNet evidence


def test_fit_prefers_the_rule_that_cross_validates_and_finds_outliers():
    rng = np.random.default_rng(0)
    # non-negative, as a backbone's pooled (ReLU6) features are: each class strong on its own channels
    centres = np.abs(rng.normal(size=(3, 64))) * 3
    x = np.maximum(np.concatenate([centres[k] + rng.normal(size=(6, 64)) for k in range(3)]), 0)
    y = np.repeat(np.arange(3), 6)
    x[5] = np.maximum(centres.max() - centres[0], 0) * 2  # filed under class 0, strong where class 0 is weak
    assert list(class_outliers(x, y)) == [5]
    sim = leave_one_out_similarity(power_transform(x), y)
    assert sim[5] < 0 < np.delete(sim, 5).min()
    keep = np.delete(np.arange(18), 5)
    fitted = fit(x[keep], y[keep], np.arange(17), 3)
    assert fitted.cv["accuracy"][fitted.method] == 1.0 and fitted.min_similarity is not None
    z = (power_transform(x[keep]) - fitted.mean)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    assert np.allclose(z, fitted.embed(x[keep]), atol=1e-6)
    assert ((z @ fitted.weights + fitted.bias).argmax(axis=1) == y[keep]).all()


def test_hint_outliers_need_a_folder_to_judge_by():
    rng = np.random.default_rng(1)
    tv = rng.normal(size=64) * 4
    emb = np.concatenate([tv + rng.normal(size=(6, 64)), -tv[None, :] + rng.normal(size=(1, 64)),
                          rng.normal(size=(4, 64)) * 4])  # six TVs, a remote, four unrelated 'misc' photos
    hints = ["tv"] * 7 + ["misc"] * 4
    assert outliers(emb, hints) == {6: "hint_outlier: unlike the other 6 photos filed as tv"}
    assert set(folder_likeness(emb, hints, JunkConfig())) == set(range(7))  # four photos: too few to judge by
    assert folder_likeness(emb[:4], hints[:4], JunkConfig()) == {}


def test_a_mixed_folder_judges_each_photo_by_its_most_alike_mate():
    """A beauty folder of perfumes, brushes and oils has no typical photo (its photos agree under
    ``outlier_coherent``), but each of them has a mate like it; the sneaker filed there has none."""
    rng = np.random.default_rng(3)
    kinds = rng.normal(size=(4, 64)) * 4  # perfume, brush, oil, sneaker
    emb = np.concatenate([kinds[k] + rng.normal(size=(2, 64)) for k in range(3)] + [kinds[3:] + rng.normal(size=(1, 64))])
    hints = ["beauty"] * 7
    cfg = JunkConfig()
    likeness = folder_likeness(emb, hints, cfg)
    assert all(like.nearest for like in likeness.values()) and set(likeness) == set(range(7))
    assert outliers(emb, hints) == {6: "hint_outlier: unlike each of the other 6 photos filed as beauty"}
    assert "most alike" in folder_verdict(None, likeness[6], "footwear", "beauty_health", cfg)[0]
    # a mate's likeness never vouches for a contradicted hint: two misfiled sneakers would vouch for each other
    mismatch = "hint_mismatch: filed as beauty_health (0.00) but looks like footwear (0.95)"
    assert folder_verdict(mismatch, likeness[0], "footwear", "beauty_health", cfg) == (mismatch, None)


def test_a_contradicted_hint_needs_a_class_the_photo_is_like():
    """A shop model says ``hint_mismatch`` when a photo is unlike its folder's class *and* like another (a sneaker
    in the hoodie folder); a photo unlike every class it knows (a multimeter filed under tools that were
    trained on hammers and pliers) is no evidence of misfiling: above the card's ``min_similarity`` it keeps its
    folder, below it it is ``unknown``."""
    cfg = JunkConfig()
    cats = ["hoodies", "sneakers", "tools"]
    card = {"centroids": np.eye(3, 4).tolist(), "min_similarity": 0.05}

    def photo(*sims: float) -> np.ndarray:  # a unit vector with these cosines to the three class means
        v = np.array([*sims, 0.0])
        v[3] = np.sqrt(1 - (v ** 2).sum())
        return v.astype(np.float32)

    sneaker = photo(0.02, 0.6, 0.0)
    assert open_set_reason(sneaker, card, cats, "sneakers", "hoodies", cfg).startswith(
        "hint_mismatch: filed as hoodies but unlike its photos (similarity 0.02); nearest class sneakers (0.60)")
    assert open_set_reason(sneaker, card, cats, "sneakers", "sneakers", cfg) is None
    novel = photo(0.08, 0.0, cfg.mismatch_alternative - 0.05)  # unlike the tools it knows, like nothing else either
    assert open_set_reason(novel, card, cats, "hoodies", "tools", cfg) is None
    assert open_set_reason(photo(0.03, 0.04, 0.0), card, cats, "sneakers", "tools", cfg).startswith(
        "unknown: nearest class sneakers at similarity 0.04 < 0.05")


def outliers(emb, hints, ref=None):
    """The photos ``folder_verdict`` calls folder outliers (the model disagreeing with every folder), with
    their reason up to the similarity."""
    cfg = JunkConfig()
    got = {i: folder_verdict(None, like, "remote", hints[i], cfg) for i, like in folder_likeness(emb, hints, cfg, ref).items()}
    return {i: junk.split(" (")[0] for i, (junk, _) in got.items() if junk}


def test_the_folder_has_its_say_on_the_models_reason():
    """An outlier is junk only when the model disagrees with its folder too; a hint_mismatch is overruled (and
    shown to a person) when the photo is as like its folder's other photos as a coherent folder's are."""
    cfg = JunkConfig()
    mismatch = "hint_mismatch: filed as footwear (0.00) but looks like sports (0.73)"
    like = Likeness(cfg.outlier_coherent + 0.04, "the other 8 photos filed as sneakers")
    junk, note = folder_verdict(mismatch, like, "sports", "footwear", cfg)
    assert junk is None and note == ("hint_vouched: filed as footwear (0.00) but looks like sports (0.73); like the "
                                     "other 8 photos filed as sneakers (similarity 0.34)")
    for weak in (None, Likeness(cfg.outlier_coherent - 0.01, "the other 8 photos filed as sneakers")):
        assert folder_verdict(mismatch, weak, "sports", "footwear", cfg) == (mismatch, None)
    not_sold = "not_sold: looks like sports (0.91); the shop's categories get 0.03"  # contradicted by what it does not sell
    assert folder_verdict(not_sold, like, "footwear", "footwear", cfg)[0] is None
    not_product = "not_product: looks like animal (0.90)"  # only the folder's category contradicted is overruled
    assert folder_verdict(not_product, like, "animal", "footwear", cfg) == (not_product, None)
    unlike = Likeness(cfg.outlier_similarity - 0.2, "the other 5 photos filed as drinks")
    assert folder_verdict(None, unlike, "food_drink", "food_drink", cfg)[1].startswith("hint_outlier: unlike")
    assert folder_verdict(None, unlike, "kitchen", "food_drink", cfg)[0].startswith("hint_outlier: unlike")
    assert folder_verdict(None, like, "food_drink", "food_drink", cfg) == (None, None)


@pytest.mark.slow
def test_evaluating_on_training_photos_is_not_called_a_test_score(few_shot):
    base, _ = few_shot
    r = CliRunner().invoke(cli, ["evaluate", str(base / "model"), str(base / "train"), "--report", str(base / "rep2")])
    assert r.exit_code == 0, r.output
    assert "were in the model's training data; this is not a test score" in r.output
    assert "NOT a test score" in (base / "rep2" / "report.md").read_text()


@pytest.mark.slow
def test_a_single_photo_class_is_warned_about_and_the_card_says_what_it_lacks(tmp_path):
    for cls, stems in (("hoodies", ["cl_bogo01_1", "cl_bogo02_1", "cl_bogo03_1"]), ("polos", ["cl_polo01"])):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for stem in stems:
            shutil.copy(SAMPLE / "images" / cls / f"{stem}.jpg", tmp_path / "data" / cls)
    r = CliRunner().invoke(cli, ["train", str(tmp_path / "data"), "--out", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    assert "warning: polos has fewer than 3 photos" in r.output
    card = read_card(tmp_path / "m")
    assert card.open_set is None and card.temperature == 1.0 and "not fitted" in card.training["calibration"]
    # hoodies and polos are both tops: the taxonomy cannot tell them apart, so no prior (the card says why)
    assert card.training["taxonomy_prior"] == {"weight": 0.0,
                                               "why_not": "the classes name fewer than two categories of the taxonomy"}


@pytest.mark.slow
def test_a_small_folder_is_judged_against_earlier_nights(tmp_path):
    """Two photos filed as juices tonight are too few to judge alone; with --store, last night's four juices
    (and the polos beside them, for the shop's mean photo) make the espresso stand out."""
    images = SAMPLE / "images"
    for night, folder, stems in (("n1", "juices", ["fd_juice_01", "fd_juice_02", "fd_juice_03", "fd_juice_05"]),
                                 ("n1", "polos", ["cl_polo01", "cl_polo02", "cl_polo03-woman", "cl_polo04-woman"]),
                                 ("n2", "juices", ["fd_juice_06", "espresso"])):
        (tmp_path / night / folder).mkdir(parents=True, exist_ok=True)
        for stem in stems:
            shutil.copy(images / ("polos" if stem.startswith("cl_") else "juices") / f"{stem}.jpg", tmp_path / night / folder)

    def night(name, *extra):
        out = tmp_path / f"{name}{len(extra)}.parquet"
        r = CliRunner().invoke(cli, ["run", str(tmp_path / name), "--out", str(out), "-q", *map(str, extra)])
        assert r.exit_code == 0, r.output
        return pq.read_table(out).to_pandas().set_index("path")

    alone = night("n2")
    assert not alone.review_reason.fillna("").str.contains("hint_outlier").any()  # two photos: not judged
    night("n1", "--store", tmp_path / "store")
    judged = night("n2", "--store", tmp_path / "store")
    espresso = judged.loc[str(tmp_path / "n2" / "juices" / "espresso.jpg")]
    assert espresso.needs_review and espresso.review_reason.startswith(
        "hint_outlier: unlike the other 5 photos filed as juices, 4 of them earlier")
    juice = judged.loc[str(tmp_path / "n2" / "juices" / "fd_juice_06.jpg")]
    assert "hint_outlier" not in str(juice.review_reason) and "hint_outlier" not in str(juice.junk_reason)


def test_reference_photos_join_their_hint_and_the_centre():
    rng = np.random.default_rng(2)
    tv = rng.normal(size=32) * 4
    earlier = tv + rng.normal(size=(5, 32))
    ref = HintReference(size=3)
    for e in earlier:
        ref.add("tv", e)
    ref.add(None, -tv)  # an unhinted photo still moves the shop's mean
    got = ref.for_hints(["tv", "misc"])
    assert got.hints == ["tv"] * 3 and np.allclose(got.embeddings, earlier[2:]) and got.count == 6
    tonight = np.stack([tv + rng.normal(size=32), -tv + rng.normal(size=32)])  # a TV and a remote
    assert outliers(tonight, ["tv", "tv"]) == {}
    assert outliers(tonight, ["tv", "tv"], got) == {1: "hint_outlier: unlike the other 4 photos filed as tv, 3 of them earlier"}


@pytest.mark.slow
def test_a_folder_of_like_photos_overrules_a_contradicted_hint_but_not_an_intruder(tmp_path):
    """With a strict --mismatch-confidence, the photo alone would junk two Saleor juice bottles in their own folder
    (ImageNet: lotion, beauty_health 0.68-0.74, food_drink 0.03-0.04); they look like the other juices, so they
    are labelled by their folder and shown to a person. A paint tin moved among the juices (the same
    contradiction, beauty_health 0.77) is unlike them and stays junk, as do the sneaker in the hoodies.
    Among all 29 categories (``--catalogue all``) the contradiction is a ``hint_mismatch``; with the shop's
    catalogue (the folders' five categories, which hold no beauty_health) the one bottle whose contradiction
    stays strict enough is ``not_sold``, and the folder overrules that the same way."""
    shutil.copytree(SAMPLE / "images", tmp_path / "in")
    shutil.move(tmp_path / "in" / "paints" / "paints_01.jpg", tmp_path / "in" / "juices" / "paints_01.jpg")

    def rows_with(*options: str):
        out = tmp_path / "out.parquet"
        r = CliRunner().invoke(cli, ["run", str(tmp_path / "in"), "--out", str(out), "-q", "--mismatch-confidence", "0.6",
                                     *options])
        assert r.exit_code == 0, r.output
        rows = pq.read_table(out).to_pandas().set_index("path")
        return {name: rows.loc[str(tmp_path / "in" / name)] for name in (
            "juices/fd_juice_01.jpg", "juices/fd_juice_06.jpg", "juices/paints_01.jpg", "hoodies/sneakers_misfiled.jpg")}

    row = rows_with("--catalogue", "all")
    for name in ("juices/fd_juice_01.jpg", "juices/fd_juice_06.jpg"):
        assert row[name].status == "labelled" and row[name].label == "food_drink" and row[name].needs_review
        assert row[name].review_reason.startswith("hint_vouched: filed as food_drink"), row[name].review_reason
        assert "like the other 6 photos filed as juices" in row[name].review_reason
    for name in ("juices/paints_01.jpg", "hoodies/sneakers_misfiled.jpg"):
        assert row[name].status == "junk" and row[name].junk_reason.startswith("hint_mismatch"), row[name].junk_reason

    row = rows_with()
    vouched = row["juices/fd_juice_01.jpg"]
    assert vouched.status == "labelled" and vouched.label == "food_drink" and vouched.needs_review
    assert vouched.review_reason.startswith("hint_vouched: looks like beauty_health"), vouched.review_reason
    assert "like the other 6 photos filed as juices" in vouched.review_reason
    assert row["juices/fd_juice_06.jpg"].label == "food_drink" and row["juices/fd_juice_06.jpg"].status == "labelled"
    assert row["juices/paints_01.jpg"].status == "junk"  # unlike the juices, whatever the model calls it
    assert row["hoodies/sneakers_misfiled.jpg"].junk_reason.startswith("hint_mismatch: filed as tops")


@pytest.mark.slow
def test_a_mixed_folder_of_real_photos_flags_the_photo_with_no_mate(tmp_path):
    """A 'gifts' folder of hoodies, juices, sneakers and wine (two of each) has no typical photo; the astronaut
    filed there is like none of them and goes to a person (the folder names no category, so no junk)."""
    (tmp_path / "in" / "gifts").mkdir(parents=True)
    for folder, stem in (("hoodies", "cl_bogo01_1"), ("hoodies", "cl_bogo03_1"), ("juices", "fd_juice_01"),
                         ("juices", "fd_juice_03"), ("sneakers", "sneakers_01_1"), ("sneakers", "sneakers_02_3"),
                         ("wine", "wine-red"), ("wine", "wine-white"), ("t-shirts", "astronaut")):
        shutil.copy(SAMPLE / "images" / folder / f"{stem}.jpg", tmp_path / "in" / "gifts")
    shutil.copytree(SAMPLE / "images" / "polos", tmp_path / "in" / "polos")  # the shop's other photos
    out = tmp_path / "out.parquet"
    r = CliRunner().invoke(cli, ["run", str(tmp_path / "in"), "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    rows = pq.read_table(out).to_pandas()
    gifts = rows[rows.path.str.contains("/gifts/")]
    gifts = gifts.set_index(gifts.path.str.rsplit("/", n=1).str[-1])
    flagged = gifts[gifts.review_reason.fillna("").str.startswith("hint_outlier")]
    assert list(flagged.index) == ["astronaut.jpg"], gifts.review_reason
    assert flagged.review_reason.iloc[0].startswith("hint_outlier: unlike each of the other 8 photos filed as gifts "
                                                    "(most alike ")
    assert (gifts.status == "labelled").all()


@pytest.mark.slow
def test_a_shop_model_adds_what_imagenet_says_of_its_categories(few_shot):
    """The classes (hoodies, juices, polos, sneakers, t-shirts) are taxonomy categories (tops, food_drink,
    footwear), so the model adds the default model's answer among them to its few-shot logits, with the weight
    cross-validation chose: the saved, converted model's probabilities are softmax((few-shot logits + weight x
    log P(category)) / T), P from the default model on the same photos."""
    from pipeline.learning.calibration import softmax
    from pipeline.learning.fewshot import taxonomy_prior
    from pipeline.models.classifier import load_classifier
    from pipeline.models.taxonomy import load_taxonomy
    from pipeline.stages.classify import predict

    base, _ = few_shot
    card = read_card(base / "model")
    prior = card.training["taxonomy_prior"]
    assert prior["categories"] == {"hoodies": "tops", "juices": "food_drink", "polos": "tops", "sneakers": "footwear",
                                   "t-shirts": "tops"}
    assert prior["weight"] > 0 and set(prior["accuracy_by_weight"]) == {"0", "0.125", "0.25", "0.5", "0.75", "1"}
    photos = [base / "test" / cls / f"{stems[-1]}.jpg" for cls, stems in PRODUCTS.items()] + [
        SAMPLE / "images" / "cushions" / "cat.jpg"]
    shop, default = load_classifier(str(base / "model"), precision="float32"), load_classifier("efficientnet_lite0",
                                                                                                 precision="float32")
    ours = predict(shop, photos)
    head = shop.model.get_layer("logits").get_weights()
    log_prior = taxonomy_prior(list(card.classes), load_taxonomy()).log_prior(predict(default, photos).probs)
    want = softmax(ours.embeddings @ head[0] + head[1] + prior["weight"] * log_prior, card.temperature)
    assert np.abs(ours.probs - want).max() < 1e-3
    without = softmax(ours.embeddings @ head[0] + head[1], card.temperature)
    assert np.abs(ours.probs - without).max() > 1e-2  # the prior is really in the model


def test_the_taxonomy_prior_is_the_default_models_answer_among_the_classes_categories():
    """``CategoryPrior`` (in the saved model) and ``TaxonomyPrior.log_prior`` (in training) compute the same
    thing: the default model's probabilities given the classes' categories (``sold_posterior``), per class. A
    class the taxonomy cannot name, or classes of one category, get no prior."""
    from pipeline.learning.calibration import softmax
    from pipeline.learning.fewshot import taxonomy_prior
    from pipeline.models.layers import CategoryPrior
    from pipeline.models.taxonomy import load_taxonomy
    from pipeline.stages.junk import sold_posterior

    tax = load_taxonomy()
    spec = taxonomy_prior(["t-shirts", "photo gear", "hoodies", "plants"], tax)
    assert spec.categories == ["tops", "cameras", "garden_plants"] and spec.classes == [0, 1, 0, 2]
    assert taxonomy_prior(["t-shirts", "spaceships"], tax) is None and taxonomy_prior(["t-shirts", "hoodies"], tax) is None
    logits = np.random.default_rng(0).normal(0, 3, (6, 1000)).astype(np.float32)
    layer = CategoryPrior(len(spec.categories), spec.classes, 0.5)
    layer.build((None, 1000))
    layer.set_weights([spec.membership(tax.product_matrix)])
    folded = tax.aggregate(softmax(logits.astype(np.float64), 1.0))[0]
    given = sold_posterior(folded, np.isin(tax.categories, spec.categories))
    want = 0.5 * np.log(given[:, [tax.categories.index(c) for c in ("tops", "cameras", "tops", "garden_plants")]] + 1e-4)
    assert np.abs(np.asarray(layer(logits)) - want).max() < 1e-4
    assert np.abs(0.5 * spec.log_prior(folded) - want).max() < 1e-5


def test_the_prior_gets_the_weight_cross_validation_gives_it():
    """A prior that puts the out-of-fold mistakes right gets a weight; one that points the wrong way gets 0."""
    from pipeline.learning.fewshot import _prior_weight

    y = np.array([0, 0, 0, 1, 1, 1])
    oof = np.array([[1, 0], [0.2, 0], [-0.1, 0], [0, 1], [0, 0.3], [0.1, 0]])  # two of six wrong
    helpful = np.log(np.where(np.eye(2)[y] > 0, 0.9, 0.1))
    weight, accuracy = _prior_weight(oof, helpful, y)
    assert weight > 0 and accuracy["0"] == pytest.approx(4 / 6, abs=1e-3) and accuracy[f"{weight:g}"] == 1.0
    assert _prior_weight(oof, helpful[:, ::-1], y)[0] == 0.0


def test_fit_weighs_the_prior_by_cross_validation_and_by_default_without_it():
    """With out-of-fold scores ``fit`` picks the prior's weight from ``PRIOR_WEIGHTS`` and the card's table has
    each weight's accuracy; with one photo a class there are none, and the weight is the default."""
    from pipeline.learning.fewshot import PRIOR_WEIGHT_UNVALIDATED, PRIOR_WEIGHTS

    rng = np.random.default_rng(3)
    x = np.abs(rng.normal(0, 1, (12, 16))).astype(np.float32)
    y = np.arange(12) % 2
    prior = np.log(np.where(np.eye(2)[y] > 0, 0.8, 0.2)).astype(np.float32)
    with_cv = fit(x, y, np.arange(12), 2, prior=prior)
    assert with_cv.prior_weight in PRIOR_WEIGHTS and set(with_cv.cv["taxonomy_prior"]) == {f"{w:g}" for w in PRIOR_WEIGHTS}
    one = fit(x[:2], y[:2], np.arange(2), 2, prior=prior[:2])
    assert one.prior_weight == PRIOR_WEIGHT_UNVALIDATED and "taxonomy_prior" not in one.cv
    assert fit(x[:2], y[:2], np.arange(2), 2).prior_weight == 0.0


def test_a_folder_most_of_whose_photos_are_confidently_elsewhere_names_no_category():
    """``unfiled_hints``: a hint with enough photos (``outlier_min_group``) most of which the model confidently
    calls another category is reported with its counts; a folder of a few misfiled photos, or too few
    photos to judge, is not."""
    from pipeline.stages.junk import unfiled_hints

    cats = ["tops", "footwear", "home_decor"]
    elsewhere, own = np.array([0.97, 0.02, 0.01]), np.array([0.02, 0.03, 0.95])
    probs = np.stack([elsewhere] * 3 + [own] * 2 + [elsewhere] * 2 + [own] * 3 + [elsewhere] * 4)
    hints = ["home"] * 5 + ["decor"] * 5 + ["lamps"] * 4
    found = unfiled_hints(probs, hints, ["home_decor"] * 14, cats, np.ones(14), np.zeros((14, 0)), [], JunkConfig())
    assert found == {"home": (3, 5)}


def test_the_saved_few_shot_model_reads_what_the_fit_saw(tmp_path):
    """The saved head applies the power transform, the centring and the unit length that ``fit`` used (loaded
    back with ``safe_mode``, on both engines): a head that skipped the transform would rank the classes
    by other distances."""
    import keras

    from conftest import build_tiny_model
    from pipeline.learning.fewshot import build_model
    from pipeline.models.card import ModelCard, load_model, save_model
    from pipeline.models.classifier import Classifier
    from pipeline.models.preprocess import IMAGENET_224
    from pipeline.stages.classify import make_step

    base = build_tiny_model()
    features = keras.Model(base.input, base.layers[-2].output)
    rng = np.random.default_rng(4)
    pixels = rng.integers(0, 255, (9, 224, 224, 3), dtype=np.uint8)
    pooled = features(pixels.astype(np.float32)).numpy()
    fitted = fit(pooled, np.arange(9) % 3, np.arange(9), 3, "centroid")
    save_model(build_model(features, fitted), ModelCard(name="pt", classes=["a", "b", "c"], arch="fewshot",
               preprocess={"name": "center_crop", "size": 224, "resize_short": 256}), tmp_path / "m")
    model, _ = load_model(tmp_path / "m")
    assert any(layer.__class__.__name__ == "PowerTransform" for layer in model.layers)
    clf = Classifier("pt", "v", model, IMAGENET_224, ["a", "b", "c"])
    for engine in ("tensorflow", "xnnpack"):
        probs, emb = (np.asarray(t) for t in make_step(clf, engine=engine)(pixels))
        assert np.abs(emb - fitted.embed(pooled)).max() < 1e-4
        logits = fitted.embed(pooled) @ fitted.weights + fitted.bias
        assert (probs.argmax(axis=1) == logits.argmax(axis=1)).all()
    plain = pooled - pooled.mean(axis=0)
    plain /= np.linalg.norm(plain, axis=1, keepdims=True)
    assert np.abs(emb - plain).max() > 1e-2  # the transform is really there


@pytest.mark.slow
def test_training_leaves_out_what_imagenet_calls_no_product_unless_the_class_sells_it(tmp_path):
    """A class of two photos cannot judge its odd one by likeness; the backbone's ImageNet evidence can (the
    rocket among cushions). A class whose photos mostly show what ImageNet calls no product is what the shop
    sells (a pet shop's cats): kept in training, recorded in the card, and not junked for it at night."""
    import skimage

    from pathlib import Path

    train = tmp_path / "train"
    for cls, files in {"hoodies": ["hoodies/cl_bogo01_1.jpg", "hoodies/cl_bogo03_1.jpg", "hoodies/cl_bogo04_1.jpg"],
                       "t-shirts": ["t-shirts/cl_boot01_1.jpg", "t-shirts/cl_boot03_1.jpg", "t-shirts/cl_boot06_1.jpg"],
                       "cushions": ["cushions/cuschion01.jpg", "paints/rocket.jpg"],
                       "pets": ["cushions/cat.jpg"]}.items():
        (train / cls).mkdir(parents=True)
        for f in files:
            shutil.copy(SAMPLE / "images" / f, train / cls)
    shutil.copy(Path(skimage.data.__file__).parent / "chelsea.png", train / "pets" / "chelsea.png")
    r = CliRunner().invoke(cli, ["train", str(train), "--out", str(tmp_path / "model")])
    assert r.exit_code == 0, r.output
    left_out = [line for line in r.output.splitlines() if line.startswith("left out")]
    assert len(left_out) == 1 and "rocket.jpg: no_product: product evidence" in left_out[0], r.output
    card = read_card(tmp_path / "model")
    assert card.training_data["per_class"] == {"hoodies": 3, "t-shirts": 3, "cushions": 1, "pets": 2}
    assert card.imagenet_evidence["ignored"] == ["animal"]
    t = night_rows(tmp_path, tmp_path / "model", {"pets": ["cushions/cat.jpg"],
                                                  "hoodies": ["hoodies/cl_bogo02_1.jpg", "paints/rocket.jpg"]})
    assert t.loc["cat.jpg", "status"] == "labelled" and t.loc["cat.jpg", "label"] == "pets"
    assert t.loc["cl_bogo02_1.jpg", "status"] == "labelled"
    assert t.loc["rocket.jpg", "junk_reason"].startswith(("no_product", "not_product"))
