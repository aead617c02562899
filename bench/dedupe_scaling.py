"""How the multi-index-hash near-duplicate search scales with the number of kept photos.

Inserts N random 64-bit pHashes (plus planted near copies) and times queries at
radius 10, against a brute-force scan over the same hashes.
Usage: ``python bench/dedupe_scaling.py [N ...]`` (default 10000 100000 1000000).
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.stages.dedupe import DEFAULT_PHASH_THRESHOLD, MultiIndexHash  # noqa: E402


def main(sizes: list[int]) -> None:
    rng = random.Random(0)
    print("| kept photos | blocks | insert µs/photo | MIH query µs | brute-force query µs (numpy) | probes, hits/query |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        hashes = [rng.getrandbits(64) for _ in range(n)]
        index = MultiIndexHash(DEFAULT_PHASH_THRESHOLD)
        t = time.perf_counter()
        for i, h in enumerate(hashes):
            index.add(i, h)
        insert = (time.perf_counter() - t) / n * 1e6
        queries = [h ^ (1 << rng.randrange(64)) for h in hashes[:200]]
        t = time.perf_counter()
        found = sum(len(index.query(q)) for q in queries)
        mih = (time.perf_counter() - t) / len(queries) * 1e6
        arr = np.array(hashes, dtype=np.uint64)
        t = time.perf_counter()
        for q in queries[:20]:
            x = arr ^ np.uint64(q)
            np.unpackbits(x.view(np.uint8)).reshape(-1, 64).sum(1)
        brute = (time.perf_counter() - t) / 20 * 1e6
        probes = sum(len(f) for f in index._flips)
        print(f"| {n:,} | {index.blocks} | {insert:.1f} | {mih:.0f} | {brute:.0f} | {probes} probes, {found / len(queries):.1f} hits |")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [10_000, 100_000, 1_000_000])
