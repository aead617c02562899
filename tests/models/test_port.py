"""The EfficientNet-Lite0 port is right: known photos get their known classes."""

import numpy as np
import pytest
from PIL import Image
from skimage import data

from pipeline.models.backbones import efficientnet_lite0
from pipeline.stages.decode import center_crop_resize
from pipeline.models.taxonomy import imagenet_classes

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


@pytest.fixture(scope="module")
def lite0():
    return efficientnet_lite0().model


def _classify(model, array):
    pixels = center_crop_resize(Image.fromarray(array).convert("RGB"), 224, 256)
    logits = model(pixels[None].astype(np.float32), training=False).numpy()[0]
    return int(logits.argmax())


@pytest.mark.slow
def test_cat_is_a_cat(lite0):
    top = _classify(lite0, data.chelsea())
    assert top in CAT_CLASSES, imagenet_classes()[top]


@pytest.mark.slow
def test_coffee_is_espresso(lite0):
    assert imagenet_classes()[_classify(lite0, data.coffee())] == "espresso"
    assert _classify(lite0, data.coffee()) == ESPRESSO


@pytest.mark.slow
def test_cached_keras_file_loads_safely_and_matches(lite0, tmp_path):
    import keras

    path = tmp_path / "m.keras"
    lite0.save(path)
    again = keras.models.load_model(path, safe_mode=True, compile=False)
    x = np.random.default_rng(0).uniform(0, 255, (2, 224, 224, 3)).astype(np.float32)
    np.testing.assert_allclose(lite0(x).numpy(), again(x).numpy(), rtol=1e-4, atol=1e-4)


def test_the_larger_lite_tables_follow_the_family_scaling():
    """Lite1/Lite2 (``bench/backbones.py``) are Lite0 scaled; their shapes as the published weights have them:
    21 MBConv blocks each, Lite2's stages 16-24-48-88-120-208-352 wide."""
    from pipeline.models.backbones import LITE0_BLOCKS, LITE1_BLOCKS, LITE2_BLOCKS, lite_blocks

    assert lite_blocks(1.0, 1.0) == LITE0_BLOCKS
    assert sum(b[0] for b in LITE1_BLOCKS) == sum(b[0] for b in LITE2_BLOCKS) == 21
    assert [b[5] for b in LITE1_BLOCKS] == [b[5] for b in LITE0_BLOCKS]
    assert [b[5] for b in LITE2_BLOCKS] == [16, 24, 48, 88, 120, 208, 352]
    assert all(a[5] == b[4] for a, b in zip(LITE2_BLOCKS, LITE2_BLOCKS[1:]))  # each stage feeds the next
