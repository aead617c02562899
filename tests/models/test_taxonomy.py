import json

import numpy as np
import pytest

from pipeline.models.taxonomy import TaxonomyError, imagenet_classes, load_taxonomy


def test_default_taxonomy_is_consistent():
    tax = load_taxonomy()
    assert len(imagenet_classes()) == 1000
    assert {"tops", "footwear", "furniture", "tv_video", "food_drink"} <= set(tax.categories)
    assert {"animal", "remote_control", "circuit_board"} <= set(tax.groups)
    # no ImageNet class is in two places
    assert ((tax.product_matrix.sum(1) + tax.group_matrix.sum(1)) <= 1).all()
    assert tax.resolve_hint("TV") == "tv_video"
    assert tax.resolve_hint("T-Shirts") == "tops"
    assert tax.resolve_hint("nonsense") is None
    dept = dict(zip(tax.categories, tax.departments))
    assert dept["furniture"] == dept["home_decor"] != dept["computers"] == dept["appliances"]  # the tablet's "microwave"
    assert dept["food_drink"] is None  # an apple is filed under no other category


@pytest.mark.parametrize("folder, category", [
    ("Camera & Photo", "cameras"), ("camera_and_photo", "cameras"), ("Photo gear", "cameras"),
    ("Sports Equipment", "sports"), ("sports-and-outdoors", "sports"), ("Computers & Accessories", "computers"),
    ("Tablets", "computers"), ("House plants", "garden_plants"), ("Grocery & Gourmet Food", "food_drink"),
    ("Beauty & Personal Care", "beauty_health"), ("Toys & Games", "toys_games"), ("Cell Phones", "phones"),
])
def test_shop_department_names_are_hints(folder, category):
    """Shops name folders after their departments, not after labelcat's categories."""
    assert load_taxonomy().resolve_hint(folder) == category


def test_aggregate_is_a_distribution_over_shop_categories():
    tax = load_taxonomy()
    raw = np.random.default_rng(0).dirichlet(np.ones(1000), size=5).astype(np.float32)
    probs, product, groups = tax.aggregate(raw)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(product + groups.sum(1) <= 1.0 + 1e-5, True)


def _write(tmp_path, doc):
    p = tmp_path / "t.json"
    p.write_text(json.dumps(doc))
    return p


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"categories": {"a": {"imagenet": ["crane"]}}}, "ambiguous"),
        ({"categories": {"a": {"imagenet": ["no such class"]}}}, "unknown ImageNet class"),
        ({"categories": {"a": {"imagenet": [1]}, "b": {"imagenet": ["0-3"]}}}, "in both"),
        ({"categories": {}}, "non-empty"),
        ({"categories": {"a": {"imagenet": [5000]}}}, "out of range"),
        ({"categories": {"a": {}}, "departments": {"home": ["a", "b"]}}, "department 'home': 'b' is not a category"),
        ({"categories": {"a": {}}, "departments": {"home": ["a"], "shop": ["a"]}}, "in both departments"),
        ({"categories": {"a": {}}, "departments": ["a"]}, "'departments' must be an object"),
        ({"categories": {"a": {}}, "departments": {"home": "a"}}, "department 'home' must be a list"),
    ],
)
def test_bad_taxonomies_are_refused_with_the_entry_named(tmp_path, doc, message):
    with pytest.raises(TaxonomyError, match=message):
        load_taxonomy(_write(tmp_path, doc))


def test_custom_taxonomy(tmp_path):
    tax = load_taxonomy(_write(tmp_path, {"name": "mine", "categories": {
        "shoes": {"aliases": ["kicks"], "imagenet": ["running shoe", "Loafer"]},
        "cups": {"imagenet": [968, "coffee mug"]}}}))
    assert tax.categories == ["shoes", "cups"] and tax.resolve_hint("Kicks") == "shoes"
    assert tax.departments == [None, None]  # a taxonomy without departments folds nothing
    assert tax.product_matrix.sum() == 4
