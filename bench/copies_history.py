"""The copy check after the model against a long history: 10,000 classified photos vs 1,000,000 kept.

What the nightly runner does with ``--store``: every kept, classified photo of earlier nights (its int8
feature codes and 32x32 thumbnail from the store's index) goes into the ``copies.EmbeddingIndex``; each of
tonight's chunks is then checked against it and against itself (``find_copies``). The script times both on
synthetic photos built to be hard on it: the kept photos are designs sold in ``--colourways`` colours
(features of one design at cosine ~0.9, above the candidate threshold, with unrelated thumbnails, as a
colourway's pixels differ), spread over ``--labels`` top categories; tonight, a tenth are copies of kept
photos (features and thumbnail slightly disturbed) and the rest new colourways of kept designs, so every
photo has a crowd of candidates and the aligned check runs ``COPY_CANDIDATES`` times for most of them; every
photo, kept or tonight's, is listed under its category and the next (``Photo.also``), as the runners list
theirs under their two most likely.

Usage: ``python bench/copies_history.py [--history 1000000] [--tonight 10000] [--labels 10]``.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.ops.store import quantise  # noqa: E402
from pipeline.stages.copies import COPY_CANDIDATES, EmbeddingIndex, Photo, find_copies  # noqa: E402
from pipeline.stages.dedupe import THUMB_SIDE  # noqa: E402

DIM = 1280  # EfficientNet-Lite0's pooled features
CHUNK = 2048


def colourways(rng: np.random.Generator, designs: np.ndarray) -> np.ndarray:
    """Features of one more colour of each of ``designs`` (rows): cosine about 0.9 to it."""
    noise = rng.standard_normal(designs.shape).astype(np.float32)
    scale = 0.48 * np.linalg.norm(designs, axis=1, keepdims=True) / np.linalg.norm(noise, axis=1, keepdims=True)
    return designs + scale * noise


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--history", type=int, default=1_000_000)
    ap.add_argument("--tonight", type=int, default=10_000)
    ap.add_argument("--labels", type=int, default=10)
    ap.add_argument("--colourways", type=int, default=20)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    designs = rng.standard_normal((args.history // args.colourways + 1, DIM)).astype(np.float32)
    design_of = np.arange(args.history) // args.colourways
    label_of = design_of % args.labels
    thumbs = rng.integers(0, 256, (args.history, THUMB_SIDE, THUMB_SIDE, 3), dtype=np.uint8)
    codes = np.empty((args.history, DIM), np.int8)
    for s in range(0, args.history, 65536):
        codes[s:s + 65536] = quantise(colourways(rng, designs[design_of[s:s + 65536]]))[0]
    print(f"generated {args.history:,} kept photos in {time.perf_counter() - t:.0f} s", file=sys.stderr)

    index = EmbeddingIndex()
    t = time.perf_counter()
    for k in range(args.history):
        index.add(Photo(-1 - k, 0, str(label_of[k]), codes[k], thumbs[k], (str((label_of[k] + 1) % args.labels),)))
    for label in range(args.labels):
        index.segments(str(label))
    load = time.perf_counter() - t

    tonight = []
    for r in range(args.tonight):
        k = int(rng.integers(args.history))
        if r < args.tonight // 10:  # a copy of a kept photo
            noise = rng.standard_normal(DIM).astype(np.float32)
            feats = codes[k].astype(np.float32) + 0.2 * noise / np.linalg.norm(noise) * np.linalg.norm(codes[k])
            thumb = np.clip(thumbs[k] + rng.normal(0, 2, thumbs[k].shape), 0, 255).astype(np.uint8)
        else:  # another colourway of a kept design
            feats = colourways(rng, designs[design_of[k]][None])[0]
            thumb = rng.integers(0, 256, thumbs[k].shape, dtype=np.uint8)
        second = (str((label_of[k] + 1) % args.labels),)  # a second category, as at night
        tonight.append(Photo(r, int(rng.integers(1, 5)) * 100, str(label_of[k]), feats, thumb, second))
    t = time.perf_counter()
    found: dict = {}
    for s in range(0, args.tonight, CHUNK):
        found |= find_copies(tonight[s:s + CHUNK], index)
    decide = time.perf_counter() - t
    right = sum(m.kept < 0 for r, m in found.items() if r < args.tonight // 10)
    print(f"\n{args.tonight:,} classified photos against {args.history:,} kept, {args.labels} top categories, designs "
          f"in {args.colourways} colourways, chunks of {CHUNK}, up to {COPY_CANDIDATES} candidates a photo\n")
    print("| load the kept photos | check tonight's photos | per photo | copies found | false copies | peak memory |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(f"| {load:.1f} s | **{decide:.1f} s** | {decide / args.tonight * 1e3:.1f} ms | {right:,}/{args.tonight // 10:,} | "
          f"{len(found) - right:,} | {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GB |")


if __name__ == "__main__":
    main()
