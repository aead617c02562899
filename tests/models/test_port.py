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
