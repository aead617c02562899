"""Fashion-MNIST, read offline from Debian's ``dataset-fashion-mnist`` package.

Why here and not tfds/keras.datasets: both download at run time. Debian ships
the original IDX files; we parse them with numpy (the format is a 4-byte magic,
big-endian dimensions, then raw uint8). ``to_fashion_mnist`` turns a product
photo into what the dataset's own pipeline made (trimmed, square, 28 px,
grey, inverted) so the studies' models can label real photos.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "LABELCAT_FASHION_MNIST_DIR"
CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DatasetMissing(RuntimeError):
    """The IDX files are not where we look; the message says how to get them."""


def data_dir() -> Path:
    return Path(os.environ.get(ENV_VAR, DEFAULT_DIR))


def _open(folder: Path, stem: str):
    for name, opener in ((stem + ".gz", gzip.open), (stem, open)):
        if (folder / name).is_file():
            return opener(folder / name, "rb")
    raise DatasetMissing(
        f"Fashion-MNIST file {stem}[.gz] not found in {folder}: install the Debian package "
        f"dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or set {ENV_VAR}"
    )


def read_idx(fh) -> np.ndarray:
    """Parse one IDX file (unsigned-byte data only, as Fashion-MNIST uses)."""
    zero, dtype_code, ndim = struct.unpack(">HBB", fh.read(4))
    if zero != 0 or dtype_code != 0x08:
        raise ValueError("not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, fh.read(4 * ndim))
    data = np.frombuffer(fh.read(), dtype=np.uint8)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"IDX payload has {data.size} values for shape {shape}")
    return data.reshape(shape)


def load(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) uint8) for ``train`` or ``test``."""
    folder = data_dir()
    img_stem, lbl_stem = FILES[split]
    with _open(folder, img_stem) as fh:
        images = read_idx(fh)
    with _open(folder, lbl_stem) as fh:
        labels = read_idx(fh)
    return images, labels


def to_fashion_mnist(img: Image.Image, background_tolerance: int = 24) -> np.ndarray:
    """A product photo → a Fashion-MNIST-style 28x28 uint8 array (light product on black).

    Fashion-MNIST was made by trimming the product off its white background,
    fitting the long side into 28 px, centring it on a square canvas,
    converting to grey and inverting. We do the same.
    """
    from .dedupe import trim_background

    obj = trim_background(img.convert("RGB"), tolerance=background_tolerance, min_fraction=0.0)
    gray = ImageOps.invert(obj.convert("L"))
    side = max(gray.size)
    canvas = Image.new("L", (side, side), 0)
    canvas.paste(gray, ((side - gray.width) // 2, (side - gray.height) // 2))
    return np.asarray(canvas.resize((28, 28), Image.LANCZOS), dtype=np.uint8)
