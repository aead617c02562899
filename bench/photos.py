"""Distinct photo-content JPEGs for the speed benches, from any list of real photos.

Why its own module: ``bench.py`` (TensorFlow) and ``gpu_bench.py`` (a GPU machine with JAX and no
TensorFlow) must time the very same kind of photo, so the mosaic recipe lives where both can import it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def mosaics(folder: Path, n: int, sources: list[Image.Image], size: tuple[int, int] = (1600, 1200),
            seed: int = 0, start: int = 0) -> list[Path]:
    """``n`` JPEGs (quality 90): 2x2 mosaics of random crops of ``sources``, each turned by a random hue,
    so that no two are near duplicates and every photo is classified. ``seed`` and ``start`` (the first
    file's number) let several processes make disjoint parts of a large set."""
    rng = np.random.default_rng(seed)
    w, h = size[0] // 2, size[1] // 2
    paths = []
    for i in range(start, start + n):
        canvas = Image.new("RGB", size)
        for k in range(4):
            src = sources[int(rng.integers(len(sources)))]
            side = rng.uniform(0.5, 1.0)
            cw, ch = max(8, int(src.width * side)), max(8, int(src.height * side))
            x, y = int(rng.integers(0, src.width - cw + 1)), int(rng.integers(0, src.height - ch + 1))
            canvas.paste(src.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BILINEAR), ((k % 2) * w, (k // 2) * h))
        hsv = np.asarray(canvas.convert("HSV")).copy()
        hsv[..., 0] += np.uint8(rng.integers(256))
        path = folder / f"photo_{i:05d}.jpg"
        Image.fromarray(hsv, "HSV").convert("RGB").save(path, quality=90)
        paths.append(path)
    return paths
