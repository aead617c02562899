"""What batch near-duplicate search (the Ray runner's ``PairSearch``) costs at 1M-100M photos.

Part 1 builds the search over N random photos (four pHash views, fine hashes
and colour grids, 10% planted near copies) and times a sample of photos
searched against all N, per worker core. From the measured cost per photo at
two sizes it projects core-hours at 10M and 100M (the candidate checks, which
dominate, grow linearly in N at a fixed block count).

Part 2 (``--compare N``) runs the same grouping three ways on N synthetic
candidates and checks they agree: the one-query-at-a-time
``DedupeIndex``, ``PairSearch`` in this process, and ``PairSearch`` on a
local Ray instance (``pip install '.[ray]'``).

Usage: ``python bench/pair_search_scaling.py [--sizes 1000000 10000000] [--compare 100000]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.stages.dedupe import THUMB_SIDE, DedupeConfig, find_duplicates
from pipeline.stages.nearpairs import VIEWS, BatchIndex, HashArrays, NearPairs, PairSearch


def random_arrays(n: int, seed: int = 0) -> HashArrays:
    """N photos' hashes (the trimmed product's, the whole photo's and its inner one); every tenth photo is a noisy copy of
    the one before it. The thumbnails are one shared blank (a read-only view: 3 KB a photo that 10M photos
    could not hold here); the search runs with the aligned check off, whose cost per pair is measured by
    ``bench/near_duplicates.py``."""
    rng = np.random.default_rng(seed)
    views = rng.integers(0, 2**63, (n, VIEWS), dtype=np.uint64) << np.uint64(1)
    whole = rng.integers(0, 2**63, (n, VIEWS), dtype=np.uint64) << np.uint64(1)
    inner = rng.integers(0, 2**63, n, dtype=np.uint64) << np.uint64(1)
    fine = rng.integers(0, 2**63, (n, VIEWS, 4), dtype=np.uint64)
    color = rng.random((n, 4, 4, 3), dtype=np.float32)
    copies = np.arange(10, n, 10)
    noise = np.uint64(0)
    for _ in range(3):
        noise |= np.uint64(1) << rng.integers(0, 64, len(copies)).astype(np.uint64)
    views[copies] = views[copies - 1] ^ noise[:, None]
    whole[copies] = whole[copies - 1] ^ noise[:, None]
    inner[copies] = inner[copies - 1] ^ noise
    fine[copies] = fine[copies - 1]
    color[copies] = color[copies - 1]
    blank = np.broadcast_to(np.zeros((1, THUMB_SIDE, THUMB_SIDE, 3), np.uint8), (n, THUMB_SIDE, THUMB_SIDE, 3))
    return HashArrays(np.arange(n, dtype=np.int64), views, fine, np.ones((n, VIEWS), bool), color, whole,
                      np.ones(n, bool), blank, inner, np.ones(n, bool))


def scaling(sizes: list[int], sample: int) -> None:
    print("| photos | blocks | build s | µs per photo searched (5 views) | checks per view (trimmed + whole + inner) | pairs found "
          "| memory (without thumbnails) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    per_photo, bytes_per_photo = {}, 0.0
    for n in sizes:
        arrays = random_arrays(n)
        t = time.perf_counter()
        search = PairSearch(arrays, DedupeConfig(align_agreement=1.1))
        build = time.perf_counter() - t
        start = n // 2
        t = time.perf_counter()
        pairs = search.search(start, start + sample)
        us = (time.perf_counter() - t) / sample * 1e6
        per_photo[n] = us
        mem = sum(getattr(arrays, f).nbytes for f in ("rows", "views", "fine", "has_view", "color", "whole", "has_whole"))
        mem += sum(a.nbytes for t in search.tables for a in t._order + t._offsets + t._sorted + t._occupied)
        bytes_per_photo = mem / n
        checks = " + ".join(f"{t.checks_per_query:,.0f}" for t in search.tables)
        print(f"| {n:,} | {search.blocks} | {build:.1f} | {us:.0f} | {checks} | "
              f"{len(pairs['photo'])} | {mem / 2**30:.2f} GiB |", flush=True)
    if len(per_photo) >= 2:
        (n0, t0), (n1, t1) = sorted(per_photo.items())[:2]
        slope = (t1 - t0) / (n1 - n0)
        for n in (10_000_000, 100_000_000):
            us = t0 + slope * (n - n0)
            print(f"projected at {n:,} photos: {us:.0f} µs per photo, {n * us / 3.6e9:,.1f} core-hours "
                  f"({n * us / 3.6e9 / 64:.1f} h on 64 cores), arrays and tables {n * bytes_per_photo / 2**30:.0f} GiB per node")


def synthetic_candidates(n: int):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import clustered_candidates

    return clustered_candidates(n, seed=0)


def compare(n: int) -> None:
    cands = synthetic_candidates(n)
    t = time.perf_counter()
    local = find_duplicates(cands)
    t_local = time.perf_counter() - t
    t = time.perf_counter()
    arrays = HashArrays.from_candidates(cands)
    inproc = find_duplicates(cands, index=NearPairs(arrays, PairSearch(arrays).search(0, n)))
    t_inproc = time.perf_counter() - t
    print(f"| grouping {n:,} photos ({len(local):,} duplicates) | seconds | same groups |")
    print("|---|---:|---|")
    print(f"| `DedupeIndex`, one query at a time | {t_local:.1f} | — |")
    print(f"| `PairSearch` + kept-first walk, one process | {t_inproc:.1f} | {inproc == local} |")
    try:
        import ray
    except ImportError:
        return
    from pipeline.runners.ray import RaySegmentSearch

    ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    search = RaySegmentSearch(DedupeConfig(), ray.cluster_resources().get("CPU", 1))
    t = time.perf_counter()
    distributed = find_duplicates(cands, index=BatchIndex(search=search))  # one chunk, searched on the actors
    print(f"| `PairSearch` on Ray actors (one per CPU, {os.cpu_count()} CPUs, start-up included) | {time.perf_counter() - t:.1f} | {distributed == local} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[1_000_000, 10_000_000])
    ap.add_argument("--sample", type=int, default=20_000, help="photos searched per size")
    ap.add_argument("--compare", type=int, default=0, help="also group N synthetic photos three ways")
    args = ap.parse_args()
    if args.sizes:
        scaling(args.sizes, args.sample)
    if args.compare:
        compare(args.compare)


if __name__ == "__main__":
    main()
