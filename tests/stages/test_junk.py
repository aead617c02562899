import numpy as np
import pytest
from PIL import Image

from pipeline.stages.junk import JunkConfig, hint_posterior, quality_reason, quality_stats, semantic_reason
from pipeline.models.taxonomy import load_taxonomy

CFG = JunkConfig()


def _reason(img):
    return quality_reason(quality_stats(img), img.width, img.height, CFG)


def test_quality_checks():
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8))
    assert _reason(noise) is None
    assert _reason(noise.resize((40, 300))).startswith("too_small")
    assert _reason(Image.new("RGB", (300, 300), (240, 240, 240))).startswith("near_blank")
    assert _reason(noise.resize((1500, 200))).startswith("extreme_aspect")


def _semantic(imagenet_index, hint):
    tax = load_taxonomy()
    raw = np.full((1, 1000), 0.02 / 999, np.float32)
    raw[0, imagenet_index] = 0.98
    probs, product, groups = tax.aggregate(raw)
    j = int(probs[0].argmax())
    return semantic_reason(tax.categories[j], float(probs[0, j]), probs[0], tax.categories, float(product[0]),
                           groups[0], tax.groups, tax.resolve_hint(hint), CFG)


def test_semantic_checks():
    assert _semantic(761, "tv").startswith("not_product: looks like remote control")  # remote in the TV folder
    assert _semantic(281, "sofas").startswith("not_product: looks like animal")  # a cat
    assert _semantic(770, "TVs").startswith("hint_mismatch: filed as tv_video")  # a running shoe filed as TV
    assert _semantic(851, "tv") is None  # a television in the TV folder
    assert _semantic(770, None) is None  # no hint, clear product
    assert _semantic(984, None).startswith("not_product: looks like scene")


def _semantic_mix(weights: dict[int, float], hint):
    tax = load_taxonomy()
    raw = np.full((1, 1000), 1e-6, np.float32)
    for i, w in weights.items():
        raw[0, i] = w
    raw /= raw.sum()
    probs, product, groups = tax.aggregate(raw)
    j = int(probs[0].argmax())
    return semantic_reason(tax.categories[j], float(probs[0, j]), probs[0], tax.categories, float(product[0]),
                           groups[0], tax.groups, tax.resolve_hint(hint), CFG)


def test_a_product_that_partly_looks_like_a_not_product_group_is_not_junk():
    # a hard disc (a computers product, not the circuit-board group any more) and a tandem bike (sports)
    assert _semantic_mix({592: 0.85, 506: 0.15}, None) is None
    assert _semantic_mix({444: 0.7, 671: 0.3}, "bikes") is None
    # a product with some not-product evidence stays a product while the product evidence is larger
    assert _semantic_mix({592: 0.55, 761: 0.45}, None) is None  # hard disc 0.55 beside remote-control 0.45
    # the remote in the TV folder is still junk: more remote than anything
    assert _semantic_mix({761: 0.6, 851: 0.4}, "tv").startswith("not_product: looks like remote control")


def test_a_hint_the_model_rules_out_is_a_mismatch_even_at_moderate_confidence():
    # an orange filed as footwear: food 0.62, accessories 0.38, footwear ~0 (the winner is no more than moderately sure)
    assert _semantic_mix({950: 0.62, 837: 0.38}, "footwear").startswith("hint_mismatch: filed as footwear (0.00)")
    assert _semantic_mix({950: 0.62, 837: 0.38}, "accessories") is None  # its hint keeps real evidence


def test_the_folder_counts_as_evidence_for_the_label():
    """The tablet filed under computers: the photo alone says appliances (0.77), the folder says computers."""
    cats = load_taxonomy().categories
    probs = np.full((3, len(cats)), 0.01 / (len(cats) - 2), np.float32)
    for row, (winner, hinted) in enumerate([(0.77, 0.22), (0.77, 0.22), (0.989, 0.001)]):
        probs[row, cats.index("appliances")], probs[row, cats.index("computers")] = winner, hinted
    hint = np.array([cats.index("computers"), -1, cats.index("computers")])
    post = hint_posterior(probs, hint, 0.9)
    assert cats[int(post[0].argmax())] == "computers" and post[0].sum() == pytest.approx(1.0)
    assert np.array_equal(post[1], probs[1])  # no hint: the photo alone
    assert cats[int(post[2].argmax())] == "appliances"  # a photo that all but rules the folder out still wins
    assert np.array_equal(hint_posterior(probs, hint, 0.0), probs)  # trust 0: hints never change a label
    assert cats[int(hint_posterior(probs, hint, 1.0)[2].argmax())] == "computers"  # trust 1: the folder always wins
    # the prior is Bayes' rule: at trust t over K categories the hinted one is weighted t (K-1) / (1-t) to 1
    w = 0.9 * (len(cats) - 1) / 0.1
    assert post[0, cats.index("computers")] == pytest.approx(0.22 * w / (0.22 * w + 0.78), rel=1e-5)
    # over a catalogue of 5 categories the same trust is the hinted one's prior among those 5: 36 to 1
    few = hint_posterior(probs, hint, 0.9, categories=5)
    assert few[0, cats.index("computers")] == pytest.approx(0.22 * 36 / (0.22 * 36 + 0.78), rel=1e-5)


def test_the_shops_catalogue_is_evidence_and_what_it_does_not_sell_is_junk():
    """Given the photo shows something the shop sells, Bayes' rule zeroes and renormalises the rest; a photo the
    model confidently calls something the shop does not sell, with the shop's own categories under the hint
    floor together, is ``not_sold``. The catalogue is the categories a person named, or (auto) the categories
    photos were filed under once there are two."""
    from pipeline.stages.junk import Catalogue, sold_posterior, unsold_reason

    cats = ["tops", "footwear", "office_books", "tools_diy"]
    auto = Catalogue(cats)
    auto.add("tools_diy")
    auto.add(None)
    auto.add("not a category")
    assert auto.sold() is None  # one folder says nothing of what else the shop sells
    auto.add("tops")
    sold = auto.sold()
    assert sold.tolist() == [True, False, False, True]
    assert Catalogue(cats, auto=False, seen={"tops", "tools_diy"}).sold() is None
    assert Catalogue(cats, fixed=frozenset({"footwear"})).sold().tolist() == [False, True, False, False]

    tweezers = np.array([[0.02, 0.0, 0.94, 0.04]], np.float32)  # ImageNet's "letter opener": office_books
    assert np.allclose(sold_posterior(tweezers, sold), [[1 / 3, 0.0, 0.0, 2 / 3]])
    assert sold_posterior(tweezers, None) is tweezers
    assert sold_posterior(np.zeros((1, 4), np.float32), sold).tolist() == [[0.0] * 4]  # a failed decode stays zero
    assert unsold_reason(tweezers[0], sold, cats, CFG) is None  # the shop's categories get 0.06: not under the floor
    book = np.array([0.01, 0.0, 0.98, 0.01], np.float32)
    assert unsold_reason(book, sold, cats, CFG) == "not_sold: looks like office_books (0.98); the shop's categories get 0.02"
    unsure = np.array([0.01, 0.2, 0.78, 0.01], np.float32)  # nothing confident outside the catalogue
    assert unsold_reason(unsure, sold, cats, CFG) is None
    assert unsold_reason(book, None, cats, CFG) is None


def test_a_shop_files_what_it_does_not_sell_under_a_folder_of_its_department():
    """A shop that sells furniture and no home_decor files its lamps under furniture: a lamp in the furniture
    folder keeps its probability there (``sold_posterior`` with the folders), is not ``not_sold``, and a
    person confirms the fold once (``folded_note``). Only under such a folder: the same lamp with no folder,
    or in the footwear folder, is read as before; an apple (no department) in any folder is ``not_sold``."""
    from pipeline.stages.junk import files_under, folded_note, sold_posterior, unsold_reason

    cats = ["furniture", "home_decor", "footwear", "underwear_swimwear", "computers", "appliances", "food_drink",
            "garden_plants"]
    depts = ["home", "home", "fashion", "fashion", "electronics", "electronics", None, "home"]  # a taxonomy of
    # one's own may put plants among home categories: the packaged one does not (a flower photo is no cushion)
    sold = np.array([c in ("furniture", "footwear", "computers", "garden_plants") for c in cats])
    furniture, footwear, computers, plants = (cats.index(c) for c in ("furniture", "footwear", "computers", "garden_plants"))

    def top(category: str, p: float = 0.9, **others: float) -> np.ndarray:
        probs = np.zeros(len(cats), np.float32)
        probs[cats.index(category)] = p
        for name, q in others.items():
            probs[cats.index(name)] = q
        return probs

    assert files_under(top("home_decor"), furniture, sold, depts) and files_under(top("appliances"), computers, sold, depts)
    assert not files_under(top("home_decor"), footwear, sold, depts) and not files_under(top("home_decor"), -1, sold, depts)
    assert not files_under(top("food_drink"), furniture, sold, depts)
    assert not files_under(top("home_decor"), furniture, sold, None)
    assert not files_under(top("furniture"), furniture, sold, depts)  # sold: nothing to fold
    # a vase that looks a little like a potted plant too: the shop sells plants, so it belongs in that folder
    assert not files_under(top("home_decor", garden_plants=0.06), furniture, sold, depts)
    assert files_under(top("home_decor", garden_plants=0.06), plants, sold, depts)

    lamp = np.array([0.01, 0.95, 0.0, 0.0, 0.02, 0.0, 0.02, 0.0], np.float32)  # lampshade, table lamp
    filed = sold_posterior(np.stack([lamp, lamp, lamp]), sold, depts, np.array([furniture, footwear, -1]))
    assert cats[int(filed[0].argmax())] == "furniture" and filed[0].max() == pytest.approx(0.96 / 0.98, rel=1e-5)
    assert np.array_equal(filed[1], filed[2]) and cats[int(filed[2].argmax())] == "computers"  # as before
    assert np.array_equal(filed[2], sold_posterior(lamp[None], sold)[0])
    assert unsold_reason(lamp, sold, cats, CFG, depts, "furniture") is None
    assert unsold_reason(lamp, sold, cats, CFG, depts, "footwear").startswith("not_sold: looks like home_decor (0.95)")
    assert unsold_reason(lamp, sold, cats, CFG).startswith("not_sold: looks like home_decor (0.95)")
    assert folded_note(lamp, "furniture", sold, cats, depts, "furniture") == (
        "folded: looks like home_decor (0.95), which the shop files under furniture")
    assert folded_note(lamp, "computers", sold, cats, depts, None) is None
    assert folded_note(lamp, "furniture", None, cats, depts, "furniture") is None  # every category sold
    apple = top("food_drink", 0.98, footwear=0.02)
    assert unsold_reason(apple, sold, cats, CFG, depts, "footwear").startswith("not_sold: looks like food_drink (0.98)")
    assert folded_note(apple, "footwear", sold, cats, depts, "footwear") is None
    # only the photo's top category folds: a little of many home categories does not make furniture
    carton = top("food_drink", 0.69, home_decor=0.3, footwear=0.01)
    assert sold_posterior(carton[None], sold, depts, np.array([furniture]))[0, furniture] == 0.0


def test_a_shop_category_all_but_ruled_out_is_not_sold_without_a_confident_winner():
    """An apple in a shop of shoes and furniture (food_drink 0.70; the shop's categories 0.004 together) would
    be a confident shoe once the catalogue renormalises; as with a contradicted hint, shop categories all but
    ruled out (under ``ruled_out``) make it ``not_sold`` at a winner of ``ruled_out_winner``."""
    from pipeline.stages.junk import unsold_reason

    cats = ["footwear", "furniture", "food_drink", "kitchen"]
    sold = np.array([True, True, False, False])
    apple = np.array([0.003, 0.001, 0.70, 0.296], np.float32)
    assert unsold_reason(apple, sold, cats, CFG) == "not_sold: looks like food_drink (0.70); the shop's categories get 0.00"
    unsure = np.array([0.003, 0.001, 0.45, 0.546], np.float32)
    assert unsold_reason(unsure, sold, cats, CFG).startswith("not_sold: looks like kitchen (0.55)")
    split = np.array([0.003, 0.001, 0.499, 0.497], np.float32)  # no category outside reaches ruled_out_winner
    assert unsold_reason(split, sold, cats, CFG) is None
    some = np.array([0.02, 0.01, 0.70, 0.27], np.float32)  # the shop's categories 0.03: not ruled out
    assert unsold_reason(some, sold, cats, CFG) is None
