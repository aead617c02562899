"""Shared fixtures: generated photos, a tiny registered model, the real default model.

The tiny model is a real Keras network (not a mock) with the same input and
output contract as the ImageNet models, so CLI and pipeline tests exercise
every stage in seconds; tests about labels use the real EfficientNet-Lite0.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
from PIL import Image

from pipeline.models.preprocess import IMAGENET_224
from pipeline.stages.decode import decode
from pipeline.models.classifier import MODELS, Classifier
from pipeline.ops.device import has_gpu
from pipeline.models.taxonomy import Taxonomy, load_taxonomy
from pipeline.stages.dedupe import Candidate, Hashes

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_catalog"
#: How each EXIF orientation (1-8) stores an upright image: the transposes applied to the upright pixels.
EXIF_TRANSFORMS = {
    1: [], 2: [Image.FLIP_LEFT_RIGHT], 3: [Image.ROTATE_180], 4: [Image.FLIP_TOP_BOTTOM],
    5: [Image.TRANSPOSE], 6: [Image.ROTATE_90], 7: [Image.TRANSVERSE], 8: [Image.ROTATE_270],
}


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
    from pipeline.models.classifier import at_precision

    tax = taxonomy or load_taxonomy()
    model = build_tiny_model()
    return Classifier(
        name="tiny_test", version=f"tiny-1+{tax.digest}", model=at_precision(model, precision),
        preprocess=IMAGENET_224, categories=list(tax.categories), taxonomy=tax, precision=precision,
    )


def jpeg_copy(img: Image.Image, q: int = 85) -> Image.Image:
    """``img`` saved as a JPEG and decoded back, as an upload would be."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=q)
    return decode(buf.getvalue())


def hue_turn(img: Image.Image, degrees: float) -> Image.Image:
    """The product (not the white backdrop) recoloured by a hue turn: a colour variant of the same article."""
    hsv = np.asarray(img.convert("HSV")).astype(np.int16)
    product = np.asarray(img.convert("RGB")).min(axis=-1) < 235
    hsv[..., 0] = np.where(product, (hsv[..., 0] + round(degrees / 360 * 256)) % 256, hsv[..., 0])
    return Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")


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
def card_model(tmp_path_factory) -> Path:
    """A tiny real model folder (``model.keras`` and its card), so subprocess and cluster runs start fast."""
    import keras

    from pipeline.models.card import ModelCard, save_model

    base = build_tiny_model()
    out = keras.layers.Dense(3, name="logits")(base.layers[-2].output)
    folder = tmp_path_factory.mktemp("models") / "tiny"
    save_model(keras.Model(base.input, out), ModelCard(
        name="tiny", classes=["bags", "footwear", "tops"],
        preprocess={"name": "center_crop", "size": 224, "resize_short": 256}, arch="tiny"), folder)
    return folder


@pytest.fixture(scope="session")
def real_classifier() -> Classifier:
    return MODELS.get("efficientnet_lite0")()


# ------------------------------------------------------------ synthetic hashes (pair search tests)


def _flip(rng, h: int, bits: int, k: int) -> int:
    for b in rng.choice(bits, k, replace=False):
        h ^= 1 << int(b)
    return h


def _random_hash(rng, bits: int) -> int:
    return int.from_bytes(rng.bytes(bits // 8), "big")


def clustered_candidates(n: int, seed: int) -> list[Candidate]:
    """Originals plus noisy copies (pHash, fine hash and colour near the original's, some
    rotated, some byte-identical), with areas that make the kept-first order matter."""
    rng = np.random.default_rng(seed)
    originals: list[Hashes] = []
    cands = []
    for i in range(n):
        if cands and rng.random() < 0.1:  # the same file again: same bytes, so the same hashes and size
            same = cands[int(rng.integers(len(cands)))]
            cands.append(Candidate(3 * i + 1, same.sha256, same.area, same.hashes))
            continue
        if originals and rng.random() < 0.5:
            b = originals[int(rng.integers(len(originals)))]
            if rng.random() < 0.2:  # the original's pixels turned a quarter
                p, f = b.rotated[0]
                h = Hashes(p, f, ((b.phash, b.fine),) * 3, np.rot90(b.color, 3).copy())
            else:
                h = Hashes(_flip(rng, b.phash, 64, int(rng.integers(0, 14))), _flip(rng, b.fine, 256, int(rng.integers(0, 50))),
                           tuple((_flip(rng, p, 64, int(rng.integers(0, 14))), f) for p, f in b.rotated),
                           (b.color + rng.normal(0, 0.02, (4, 4, 3))).astype(np.float32))  # re-encode-sized colour noise
        else:
            h = Hashes(_random_hash(rng, 64), _random_hash(rng, 256),
                       tuple((_random_hash(rng, 64), _random_hash(rng, 256)) for _ in range(3)),
                       rng.random((4, 4, 3)).astype(np.float32))
            originals.append(h)
        cands.append(Candidate(3 * i + 1, f"sha{i}", int(rng.integers(1, 5)) * 100, h))
    return cands
