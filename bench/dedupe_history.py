"""Tonight's photos against a long history: dedupe decisions for 10,000 new photos vs 1,000,000 kept.

What the nightly runner does with ``--store``: the kept photos of earlier nights are loaded into the match
index, then tonight's photos are deduplicated chunk by chunk (``--chunk-size``, default 2048) against them
and against each other. The script times, on random 64/256-bit hashes and random 32x32 thumbnails (3 KB a
photo, as the store keeps them for the aligned check) with planted copies (a tenth of tonight's photos are
near copies of kept photos, a tenth copies of each other, some turned a quarter):

- loading: ``BatchIndex.add`` for every kept photo and the first ``PairSearch`` segment built from them;
- deciding: ``find_duplicates`` over tonight's chunks with ``BatchIndex`` (bulk search per chunk);
- the one-query-at-a-time ``DedupeIndex`` on tonight's first chunk, to check both decide the same and to
  project its time for all of tonight's photos.

Usage: ``python bench/dedupe_history.py [--history 1000000] [--tonight 10000]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.stages.dedupe import THUMB_SIDE, VIEW_NAMES, Candidate, DedupeIndex, Hashes, find_duplicates  # noqa: E402
from pipeline.stages.nearpairs import BatchIndex  # noqa: E402

CHUNK = 2048


def random_hashes(rng: np.random.Generator, n: int) -> list[Hashes]:
    """``n`` unrelated photos: random pHashes for every view (trimmed and whole), inner pHashes, colour grids,
    thumbnails."""
    coarse = rng.integers(0, 2**63, (n, len(VIEW_NAMES)), dtype=np.uint64) << np.uint64(1)
    whole = rng.integers(0, 2**63, (n, len(VIEW_NAMES)), dtype=np.uint64) << np.uint64(1)
    inner = (rng.integers(0, 2**63, n, dtype=np.uint64) << np.uint64(1)).tolist()
    fine = [int.from_bytes(b, "big") for b in np.frombuffer(rng.bytes(32 * n * len(VIEW_NAMES)), "S32")]
    color = rng.random((n, 4, 4, 3), dtype=np.float32)
    thumbs = rng.integers(0, 256, (n, THUMB_SIDE, THUMB_SIDE, 3), dtype=np.uint8)
    out = []
    for i, (row, w) in enumerate(zip(coarse.tolist(), whole.tolist())):
        f = fine[i * len(VIEW_NAMES):(i + 1) * len(VIEW_NAMES)]
        out.append(Hashes(row[0], f[0], tuple(zip(row[1:], f[1:])), color[i], tuple(w), thumbs[i], inner[i]))
    return out


def near_copy(rng: np.random.Generator, h: Hashes) -> Hashes:
    """A re-encode-like copy: a few pHash bits flipped, a little colour and pixel noise; a fifth are turned a
    quarter."""
    if rng.random() < 0.2:
        p, f = h.rotated[0]
        return Hashes(p, f, ((h.phash, h.fine),) * (len(VIEW_NAMES) - 1), np.rot90(h.color, 3).copy(),
                      (h.whole[1],) + (h.whole[0],) * (len(VIEW_NAMES) - 1), np.rot90(h.thumb, 3).copy(), h.inner)
    flip = sum(1 << int(b) for b in rng.choice(64, int(rng.integers(0, 6)), replace=False))
    thumb = np.clip(h.thumb + rng.normal(0, 2, h.thumb.shape), 0, 255).astype(np.uint8)
    return Hashes(h.phash ^ flip, h.fine, h.rotated, (h.color + rng.normal(0, 0.01, h.color.shape)).astype(np.float32),
                  h.whole, thumb, h.inner)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--history", type=int, default=1_000_000)
    ap.add_argument("--tonight", type=int, default=10_000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    kept = random_hashes(rng, args.history)
    new = random_hashes(rng, args.tonight)
    for i in range(0, args.tonight // 10):  # copies of earlier nights' photos
        new[i] = near_copy(rng, kept[int(rng.integers(args.history))])
    for i in range(args.tonight // 10, args.tonight // 5):  # copies of tonight's own photos
        new[i] = near_copy(rng, new[int(rng.integers(args.tonight // 5, args.tonight))])
    tonight = [Candidate(r, f"new{r}", int(rng.integers(1, 5)) * 100, h) for r, h in enumerate(new)]
    print(f"generated {args.history:,} kept + {args.tonight:,} new photos' hashes in {time.perf_counter() - t:.1f} s")

    batch = BatchIndex()
    t = time.perf_counter()
    for k, h in enumerate(kept):
        batch.add(-1 - k, f"old{k}", h)
    batch.prepare([])  # the history's segment is built here
    load = time.perf_counter() - t
    t = time.perf_counter()
    decided: dict[int, object] = {}
    for s in range(0, args.tonight, CHUNK):
        decided |= find_duplicates(tonight[s:s + CHUNK], index=batch)
    bulk = time.perf_counter() - t
    old = sum(m.kept < 0 for m in decided.values())

    walk = DedupeIndex()
    t = time.perf_counter()
    for k, h in enumerate(kept):
        walk.add(-1 - k, f"old{k}", h)
    walk_load = time.perf_counter() - t
    first = tonight[:CHUNK]
    t = time.perf_counter()
    expected = find_duplicates(first, index=walk)
    per_photo = (time.perf_counter() - t) / len(first)
    same = expected == {r: m for r, m in decided.items() if r < CHUNK}

    print(f"\n{args.tonight:,} new photos against {args.history:,} kept, chunks of {CHUNK} "
          f"({len(decided):,} duplicates, {old:,} of them of earlier nights)\n")
    print("| index | load the kept photos, s | decide tonight's photos, s |")
    print("|---|---:|---:|")
    print(f"| `BatchIndex` (bulk `PairSearch` per chunk, the runners') | {load:.1f} | **{bulk:.1f}** |")
    print(f"| `DedupeIndex` (one query at a time) | {walk_load:.1f} | {per_photo * args.tonight:.0f} "
          f"(projected from its first chunk: {per_photo * 1e3:.1f} ms a photo) |")
    print(f"\nsame decisions on the first chunk: {same}")


if __name__ == "__main__":
    main()
