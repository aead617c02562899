import numpy as np
from PIL import Image

from pipeline.stages.junk import JunkConfig, quality_reason, quality_stats, semantic_reason
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
