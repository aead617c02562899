"""Shared fixtures: generated photos, a tiny registered model, the real default model.

The tiny model is a real Keras network (not a mock) with the same input and
output contract as the ImageNet models, so CLI and pipeline tests exercise
every stage in seconds; tests about labels use the real EfficientNet-Lite0.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
from PIL import Image

from pipeline.models.preprocess import IMAGENET_224
from pipeline.models.classifier import MODELS, Classifier
from pipeline.ops.device import has_gpu
from pipeline.models.taxonomy import Taxonomy, load_taxonomy

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_catalog"


def build_tiny_model():
    """A deterministic 1000-way conv net on 224 px input: fast, real TensorFlow."""
    has_gpu()
    import keras

    keras.utils.set_random_seed(7)
    inputs = keras.Input((224, 224, 3), name="image")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = keras.layers.AveragePooling2D(8)(x)
    x = keras.layers.Conv2D(8, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(1000, name="logits")(x)
    return keras.Model(inputs, outputs, name="tiny")


@MODELS.register("tiny_test")
def tiny_test(taxonomy: Taxonomy | None = None, precision: str = "float32") -> Classifier:
    """A tiny random network with the ImageNet output contract, for tests only."""
    from pipeline.models.classifier import to_mixed_precision

    tax = taxonomy or load_taxonomy()
    model = build_tiny_model()
    return Classifier(
        name="tiny_test", version=f"tiny-1+{tax.digest}", model=to_mixed_precision(model) if precision == "mixed" else model,
        preprocess=IMAGENET_224, categories=list(tax.categories), taxonomy=tax, precision=precision,
    )


def product_photo(color=(200, 30, 30), size=(400, 400), shape="shirt", seed=0) -> Image.Image:
    """A synthetic 'product on white': a coloured shape with some texture."""
    rng = np.random.default_rng(seed)
    w, h = size
    arr = np.full((h, w, 3), 255, np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    if shape == "shirt":
        body = (abs(xx - w / 2) < w * 0.22) & (yy > h * 0.25) & (yy < h * 0.85)
        sleeves = (abs(yy - h * 0.33) < h * 0.08) & (abs(xx - w / 2) < w * 0.38)
        mask = body | sleeves
    else:
        mask = (xx - w / 2) ** 2 / (w * 0.3) ** 2 + (yy - h / 2) ** 2 / (h * 0.2) ** 2 < 1
    shade = (0.75 + 0.25 * np.sin(xx / 40.0 + seed) * np.cos(yy / 55.0))[..., None]  # fabric folds
    arr[mask] = np.clip(np.array(color)[None, :] * shade[mask], 0, 255).astype(np.uint8)
    # A printed graphic (a logo ring and two stripes), as real products carry.
    ring = abs(np.hypot(xx - w * 0.41, yy - h * 0.47) - w * 0.08) < w * 0.02  # off-centre, as prints are
    stripes = ((abs(yy - h * 0.68) < h * 0.025) | (abs(yy - h * 0.76) < h * 0.012)) & (xx > w * 0.45)
    arr[mask & (ring | stripes)] = (250, 250, 240)
    arr = np.clip(arr.astype(int) + rng.integers(-6, 7, arr.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


@pytest.fixture(scope="session")
def tiny_classifier() -> Classifier:
    return tiny_test()


@pytest.fixture(scope="session")
def real_classifier() -> Classifier:
    return MODELS.get("efficientnet_lite0")()
