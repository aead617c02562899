"""Near duplicates of a whole batch at once: vectorised, shardable pair search.

Why a second search structure: ``DedupeIndex`` answers one query at a time in
Python, which is right for a nightly chunk but costs about a day of one core
at 10M photos. Here every photo's hashes sit in flat numpy arrays (about 350
bytes a photo), the multi-index tables are sorted arrays probed with
``searchsorted`` for thousands of queries at once, and any range of photos can
be searched independently of the others, so a cluster splits the work by rows
(``ray_runner``) while every worker reads the same arrays.

It does not decide who is a duplicate: it lists, for each photo, every other
photo that passes the same rule as ``dedupe.DedupeIndex.match`` (the trimmed
product's or the whole photo's pHash within the radius for any of the photo's
views (rotations, mirror), then the hash rule and the aligned check, ``dedupe.confirm``), in the
order that method would try them. ``NearPairs`` then
plays ``find_duplicates``' kept-first walk over those sparse lists, so both
runners group photos identically (a test checks it).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Protocol

import numpy as np

from pipeline.stages.dedupe import (HASH_BITS, INNER_VIEWS, THUMB_SIDE, VIEW_NAMES, WHOLE_VIEWS, Candidate,
                                    DedupeConfig, Hashes, block_flips, block_radii, block_widths, color_distance,
                                    confirm, plan_blocks, view_of)

VIEWS = len(VIEW_NAMES)  # upright, pixel rotations by 90, 180, 270 degrees, mirror
PAIR_BUDGET = 4_000_000  # candidate checks held in memory at once per worker
MAX_BLOCK_BITS = 24  # a block's offset table has 2**bits entries


def _words(h: int) -> list[int]:
    """A 256-bit hash as four 64-bit words, most significant first."""
    return [(h >> (64 * i)) & 0xFFFFFFFFFFFFFFFF for i in (3, 2, 1, 0)]


@dataclass
class HashArrays:
    """The hashes of N photos as flat arrays (what a worker needs to search them).

    ``views[i, k]`` is the 64-bit pHash of photo i in view k (``VIEW_NAMES``:
    0 upright, 1-3 quarter turns, 4 mirrored), ``fine[i, k]`` its 256-bit hash
    as four words; ``has_view`` marks views a photo has (photos indexed by an
    older version have no mirror). ``whole`` and ``thumb`` are the whole
    photo's pHash per view and thumbnail (``has_whole``: photos indexed
    before they were kept have neither); the thumbnails are most of the
    arrays' size, 3 KB a photo. ``inner`` is the upright photo's inner pHash
    (``Hashes.inner``; ``has_inner`` false for photos indexed before it).
    """

    rows: np.ndarray  # int64 [N], the run's row numbers
    views: np.ndarray  # uint64 [N, 5]
    fine: np.ndarray  # uint64 [N, 5, 4]
    has_view: np.ndarray  # bool [N, 5]
    color: np.ndarray  # float32 [N, 4, 4, 3], upright
    whole: np.ndarray  # uint64 [N, 5]
    has_whole: np.ndarray  # bool [N]
    thumb: np.ndarray  # uint8 [N, 32, 32, 3], upright (zeros where has_whole is false)
    inner: np.ndarray  # uint64 [N]
    has_inner: np.ndarray  # bool [N]

    @classmethod
    def from_candidates(cls, cands: list[Candidate]) -> "HashArrays":
        n = len(cands)
        views = np.zeros((n, VIEWS), np.uint64)
        fine = np.zeros((n, VIEWS, 4), np.uint64)
        has = np.zeros((n, VIEWS), bool)
        whole = np.zeros((n, VIEWS), np.uint64)
        has_whole = np.zeros(n, bool)
        thumb = np.zeros((n, THUMB_SIDE, THUMB_SIDE, 3), np.uint8)
        for i, c in enumerate(cands):
            for k, (p, f) in enumerate(((c.hashes.phash, c.hashes.fine), *c.hashes.rotated)):
                views[i, k], fine[i, k], has[i, k] = p, _words(f), True
            if c.hashes.whole and c.hashes.thumb is not None:
                whole[i], has_whole[i], thumb[i] = c.hashes.whole, True, c.hashes.thumb
        color = np.array([c.hashes.color for c in cands], np.float32).reshape(n, 4, 4, 3)
        has_inner = np.array([c.hashes.inner is not None for c in cands], bool)
        inner = np.array([c.hashes.inner or 0 for c in cands], np.uint64)
        return cls(np.array([c.row for c in cands], np.int64), views, fine, has, color, whole, has_whole, thumb,
                   inner, has_inner)

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def concat(cls, parts: list["HashArrays"]) -> "HashArrays":
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)))


class BucketTables:
    """Multi-index hash over one 64-bit hash per photo, as numpy bucket tables.

    Same pigeonhole as ``dedupe.MultiIndexHash``: with ``m`` blocks, two hashes
    within ``r`` bits agree within ``block_radii`` bits on some block, so each
    query probes every key within that distance of each of its blocks. Each
    block's table is the photos sorted by block value plus an offset per
    possible value (blocks are at most ``MAX_BLOCK_BITS`` wide), so a probe is
    an array read, not a search. Built once per worker in O(N log N).

    Why an occupancy byte per bucket before the offsets: at a million photos
    most probed buckets of a 21-22-bit block are empty (60-80%), and the
    probes' reads into offset tables of 8-16 MB were most of a search's time;
    a byte per bucket is a quarter of that memory, and only occupied buckets'
    offsets are read (``bench/dedupe_history.py``).
    """

    def __init__(self, hashes: np.ndarray, photos: np.ndarray, radius: int, blocks: int) -> None:
        self.radius = radius
        widths = block_widths(blocks)
        if max(widths) > MAX_BLOCK_BITS:
            raise ValueError(f"{blocks} blocks are {max(widths)} bits wide; at most {MAX_BLOCK_BITS} fit a table")
        self._shifts = [HASH_BITS - sum(widths[: i + 1]) for i in range(blocks)]
        self._masks = [np.uint64((1 << w) - 1) for w in widths]
        n = max(len(hashes), 1)
        self._flips = [np.array(block_flips(w, t), np.uint32)  # blocks fit 32 bits: half the probes' bytes
                       for w, t in zip(widths, block_radii(n, radius, blocks))]
        # per block: photos by block value, bucket starts, hashes, whether a bucket holds any
        self._order, self._offsets, self._sorted, self._occupied = [], [], [], []
        for shift, mask, w in zip(self._shifts, self._masks, widths):
            key = ((hashes >> np.uint64(shift)) & mask).astype(np.int64)
            by_block = np.argsort(key, kind="stable")
            self._order.append(photos[by_block])
            self._sorted.append(hashes[by_block])
            sizes = np.bincount(key, minlength=1 << w)
            self._occupied.append(sizes > 0)
            starts = np.concatenate([[0], np.cumsum(sizes)])
            self._offsets.append(starts.astype(np.int32 if len(hashes) < 2**31 else np.int64))  # half the cache misses
        self.checks_per_query = sum(n * len(f) / 2.0 ** w for f, w in zip(self._flips, widths))
        self.probes_per_query = sum(len(f) for f in self._flips)

    def candidates(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(query position, photo) of every stored hash within the radius of hashes ``q`` (pairs may repeat)."""
        qi_all, hit_all = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        for shift, mask, flips, order, offsets, hashes, occupied in zip(
                self._shifts, self._masks, self._flips, self._order, self._offsets, self._sorted, self._occupied):
            probes = (((q >> np.uint64(shift)) & mask).astype(np.uint32)[:, None] ^ flips[None, :]).ravel()
            hit = np.flatnonzero(np.take(occupied, probes))  # probe i is query i // len(flips)'s
            buckets = probes[hit]
            lo = np.take(offsets, buckets)
            counts = np.take(offsets, buckets + 1) - lo
            total = int(counts.sum())
            if not total:
                continue
            # positions of every photo in every occupied probed bucket, and the query each belongs to
            starts = np.repeat(lo - np.cumsum(counts) + counts, counts) + np.arange(total)
            qi = np.repeat(hit // len(flips), counts)
            close = np.bitwise_count(q[qi] ^ hashes[starts]) <= self.radius
            qi_all.append(qi[close])
            hit_all.append(order[starts[close]])
        return np.concatenate(qi_all), np.concatenate(hit_all)


class PairSearch:
    """Bucket tables over the upright pHashes of all photos: the trimmed product's, the whole photo's and its
    inner one's (``Hashes.inner``, searched with the whole photo's, as ``DedupeIndex.match`` does).

    ``search`` takes any slice of photos and applies ``DedupeIndex.match``'s
    checks to every candidate pair in bulk.
    """

    def __init__(self, arrays: HashArrays, cfg: DedupeConfig = DedupeConfig(), blocks: int | None = None) -> None:
        self.a, self.cfg = arrays, cfg
        self.radius = cfg.phash_threshold
        self.blocks = blocks or plan_blocks(max(len(arrays), 1), self.radius, MAX_BLOCK_BITS)
        everyone = np.arange(len(arrays))
        self._trimmed = BucketTables(arrays.views[:, 0], everyone, self.radius, self.blocks)
        self._whole_tables: list[tuple[BucketTables, tuple[int, ...]]] = []  # searched with a photo's whole
        for hashes, has, views in ((arrays.whole[:, 0], arrays.has_whole, WHOLE_VIEWS),  # pHash in these views
                                   (arrays.inner, arrays.has_inner, INNER_VIEWS)):
            if has.any():
                photos = np.flatnonzero(has)
                self._whole_tables.append((BucketTables(hashes[photos], photos, self.radius, self.blocks), views))

    @property
    def tables(self) -> list[BucketTables]:
        """Every bucket table: the trimmed pHashes', then those searched with a photo's whole pHash."""
        return [self._trimmed, *(table for table, _ in self._whole_tables)]

    def query_batch(self) -> int:
        """Queries per vectorised step, so that probes and candidates fit ``PAIR_BUDGET``."""
        per_query = max(max(t.checks_per_query + t.probes_per_query for t in self.tables), 1.0)  # one at a time
        return int(max(1, min(8192, PAIR_BUDGET // per_query)))

    def _candidates(self, q: HashArrays, sel: np.ndarray, view: int) -> tuple[np.ndarray, np.ndarray]:
        """(query photo, searched photo) pairs within the radius by the trimmed or the whole pHash (against the
        searched photos' whole ones in ``WHOLE_VIEWS``, and their inner ones in ``INNER_VIEWS``), once each."""
        qpos, other = self._trimmed.candidates(q.views[sel, view])
        photo = [sel[qpos]]
        others = [other]
        sel_w = sel[q.has_whole[sel]]
        for table, views in self._whole_tables:
            if view in views:
                qpos, other = table.candidates(q.whole[sel_w, view])
                photo.append(sel_w[qpos])
                others.append(other)
        pair = np.unique(np.concatenate(photo).astype(np.int64) * len(self.a) + np.concatenate(others))
        return pair // len(self.a), pair % len(self.a)

    def search(self, start: int, stop: int, queries: HashArrays | None = None,
               before: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Verified near pairs of photos ``start:stop`` of ``queries`` (default: the searched photos
        themselves, each then skipping itself) against all searched photos. ``before`` (searching the
        photos themselves, in walk order): photo i is paired only with photos at positions under
        ``before[i]``, the only ones the walk can use when it reaches it (``walk_horizon``), so most
        pairs are checked once, not twice.

        Returns columns ``photo`` (index into ``queries``), ``view``, ``distance``
        (the nearer of the trimmed and whole pHash distances), ``other`` (index
        into the searched arrays): ``photo`` seen in rotation ``view`` matches
        ``other`` upright.
        """
        a, q, cfg = self.a, self.a if queries is None else queries, self.cfg
        out: dict[str, list[np.ndarray]] = {"photo": [], "view": [], "distance": [], "other": []}
        step = self.query_batch()
        for s in range(start, stop, step):
            idx = np.arange(s, min(s + step, stop))
            for view in range(VIEWS):
                sel = idx[q.has_view[idx, view]]
                photo, other = self._candidates(q, sel, view)
                if queries is None:
                    keep = other < before[photo] if before is not None else photo != other
                    photo, other = photo[keep], other[keep]
                fine_d = np.bitwise_count(q.fine[photo, view] ^ a.fine[other, 0]).sum(axis=1)
                turned = view_of(q.color[photo], view)  # the view's colour, as in DedupeIndex.match
                color_d = color_distance(turned, a.color[other])
                coarse_d = np.bitwise_count(q.views[photo, view] ^ a.views[other, 0]).astype(np.int16)
                both = q.has_whole[photo] & a.has_whole[other]
                whole_d = np.where(both, np.bitwise_count(q.whole[photo, view] ^ a.whole[other, 0]), HASH_BITS)
                near_d = np.minimum(coarse_d, whole_d)  # the search's distance, ``dedupe.candidate_distance``
                ok = (coarse_d <= self.radius) & (fine_d <= cfg.fine_limit(near_d)) & (color_d <= cfg.color_threshold)
                pixels = np.flatnonzero(both) if cfg.aligned else np.zeros(0, np.intp)
                if len(pixels):  # with thumbnails on both sides, as ``dedupe.near_all``
                    ok[pixels] = confirm(ok[pixels], view_of(q.thumb[photo[pixels]], view), a.thumb[other[pixels]], cfg)
                out["photo"].append(photo[ok])
                out["view"].append(np.full(int(ok.sum()), view, np.int8))
                out["distance"].append(near_d[ok].astype(np.int16))
                out["other"].append(other[ok])
        return {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in out.items()}


def one_per_file(cands: list[Candidate], known: dict[str, int]) -> tuple[list[Candidate], list[tuple[int, int]]]:
    """(the candidates to search, (copy row, first row) for the rest): the first photo of each file's
    bytes in walk order, leaving out copies of a photo already kept (``known`` sha256s).

    Why: exact copies are matched by their sha256 before any pair is looked at, and a later copy of a
    file has its first photo's hashes, so it can borrow that photo's pairs (``NearPairs.borrow``).
    Searching every copy made n^2/2 pairs for n copies of one file, each aligned pixel by pixel.
    """
    first: dict[str, int] = {}
    searched, borrowing = [], []
    for c in cands:
        if c.sha256 in known:
            continue
        if first.setdefault(c.sha256, c.row) == c.row:
            searched.append(c)
        else:
            borrowing.append((c.row, first[c.sha256]))
    return searched, borrowing


def walk_horizon(walk: list[Candidate], searched: list[Candidate], borrowing: list[tuple[int, int]]) -> np.ndarray:
    """For each searched photo (``one_per_file``'s, in walk order), how many searched photos the walk has met
    by the time it reaches this photo's file for the last time: the photos its pairs may be needed with.

    Why not just the earlier photos: a later copy of the same file borrows the first one's pairs
    (``NearPairs.borrow``), and when the first was not kept (a near duplicate itself), the copy must still
    find the photos kept between the two in the walk (photos of the same size, by row), as asking photo by
    photo does.
    """
    position = {c.row: i for i, c in enumerate(searched)}
    first_of = dict(borrowing)
    before = np.arange(len(searched))
    met = 0
    for c in walk:
        if c.row in position:
            met = position[c.row] + 1
        elif c.row in first_of:
            i = position[first_of[c.row]]
            before[i] = max(before[i], met)
    return before


class NearPairs:
    """A ``DedupeIndex`` stand-in for ``find_duplicates`` that looks matches up in precomputed pairs.

    ``match`` returns the first *kept* photo among the candidate's verified
    pairs in ``DedupeIndex.match``'s order (upright view first, then each
    rotation, then the mirror; nearest first, then lowest row), after the exact-copy check, so
    ``find_duplicates`` makes the same decisions with either index.
    """

    def __init__(self, arrays: HashArrays, pairs: dict[str, np.ndarray]) -> None:
        self.by_sha: dict[str, int] = {}
        self.kept: set[int] = set()
        self._lookup(arrays.rows, pairs["photo"], pairs["view"], pairs["distance"], arrays.rows[pairs["other"]])

    def _lookup(self, rows: np.ndarray, photo: np.ndarray, view: np.ndarray, distance: np.ndarray,
                other_row: np.ndarray) -> None:
        """Index the pairs (``photo`` an index into ``rows``, the other photo by its key) in match order."""
        order = np.lexsort((other_row, distance, view, photo))
        photo = photo[order]
        self._other_row = other_row[order].tolist()
        self._distance = distance[order].tolist()
        bounds = np.searchsorted(photo, np.arange(len(rows) + 1))
        self._slice = {int(r): (int(bounds[i]), int(bounds[i + 1])) for i, r in enumerate(rows) if bounds[i] < bounds[i + 1]}

    def __len__(self) -> int:
        return len(self.kept)

    def add(self, key: int, sha256: str, hashes: Hashes | None = None) -> None:
        self.by_sha.setdefault(sha256, key)
        self.kept.add(key)

    def discard(self, key: int, sha256: str) -> None:
        """Stop matching a kept photo (its pairs stay and are skipped, as those of photos never kept are)."""
        self.kept.discard(key)
        if self.by_sha.get(sha256) == key:
            del self.by_sha[sha256]

    def prepare(self, cands: list[Candidate]) -> None:
        """Nothing to do: the pairs were searched when this index was built."""

    def borrow(self, borrowing: list[tuple[int, int]]) -> None:
        """Give each (copy, first) row of ``one_per_file`` the pairs searched for the first photo of its file."""
        for row, first in borrowing:
            if first in self._slice:
                self._slice[row] = self._slice[first]

    def match(self, cand: Candidate) -> tuple[int, str, int] | None:
        if cand.sha256 in self.by_sha:
            return self.by_sha[cand.sha256], "exact", 0
        lo, hi = self._slice.get(cand.row, (0, 0))
        for i in range(lo, hi):
            if self._other_row[i] in self.kept:
                return self._other_row[i], "near", self._distance[i]
        return None


class SegmentSearch(Protocol):
    """Where ``BatchIndex`` searches: its kept segments, then each chunk's photos against them."""

    def keep(self, segments: list[HashArrays]) -> None:
        """Be ready to search these segments (the kept photos so far); segments no longer listed are dropped."""

    def __call__(self, queries: HashArrays, before: np.ndarray) -> list[dict[str, np.ndarray]]:
        """The verified pairs of ``queries`` against each kept segment, then against the queries before
        each one's ``before`` (``PairSearch.search``'s columns; ``photo`` indexes the queries, ``other``
        the segment or the queries)."""


class SearchHere:
    """``BatchIndex``'s search in this process: each segment's bucket tables built once, while it is kept.

    (The Ray runner's ``RaySegmentSearch`` does the same on actors.)
    """

    def __init__(self, cfg: DedupeConfig = DedupeConfig()) -> None:
        self.cfg = cfg
        self._built: list[PairSearch] = []

    def keep(self, segments: list[HashArrays]) -> None:
        self._built = [next((b for b in self._built if b.a is s), None) or PairSearch(s, self.cfg) for s in segments]

    def __call__(self, queries: HashArrays, before: np.ndarray) -> list[dict[str, np.ndarray]]:
        return [b.search(0, len(queries), queries) for b in self._built] + [
            PairSearch(queries, self.cfg).search(0, len(queries), before=before)]


class BatchIndex(NearPairs):
    """The nightly runners' match index: ``DedupeIndex``'s decisions, searched a chunk at a time.

    Why: asking the multi-index hash one photo and one view at a time costs
    about 4 ms a query in Python against a million kept photos, so 10,000 new
    photos against a long history would take minutes. Here the kept photos
    (earlier nights, earlier chunks) sit in a few segments of ``HashArrays``;
    ``prepare`` searches all of a chunk's candidates against every segment and
    against each other in bulk (``search``: here, or on Ray actors), and
    ``find_duplicates`` then walks the pairs exactly as ``NearPairs`` does.
    Photos kept during a walk become a new segment at the next ``prepare``; a
    segment at least as large as the one before it is merged into it, so
    there are O(log n) segments and each photo is re-sorted O(log n) times.
    """

    def __init__(self, cfg: DedupeConfig = DedupeConfig(), search: SegmentSearch | None = None) -> None:
        self.cfg = cfg
        self.by_sha = {}
        self.kept = set()
        self._pending: list[Candidate] = []
        self._segments: list[HashArrays] = []
        self._search = search or SearchHere(cfg)
        self._slice: dict[int, tuple[int, int]] = {}

    def add(self, key: int, sha256: str, hashes: Hashes | None = None) -> None:
        super().add(key, sha256)
        self._pending.append(Candidate(key, sha256, 0, hashes))

    def _flush(self) -> None:
        if not self._pending:
            return
        arrays = HashArrays.from_candidates(self._pending)
        self._pending = []
        while self._segments and len(self._segments[-1]) <= len(arrays):
            arrays = HashArrays.concat([self._segments.pop(), arrays])
        self._segments.append(arrays)
        self._search.keep(self._segments)

    def prepare(self, cands: list[Candidate]) -> None:
        """Search ``cands`` against every kept photo and each other, before ``find_duplicates`` walks them."""
        self._flush()
        searched, borrowing = one_per_file(cands, self.by_sha)
        if not searched:
            self._slice = {}
            return
        queries = HashArrays.from_candidates(searched)
        before = walk_horizon(cands, searched, borrowing)
        found = list(zip(self._search(queries, before), [s.rows for s in self._segments] + [queries.rows]))
        cols = {k: np.concatenate([p[k] for p, _ in found]) for k in ("photo", "view", "distance")}
        other_row = np.concatenate([rows[p["other"]] for p, rows in found])
        self._lookup(queries.rows, cols["photo"], cols["view"], cols["distance"], other_row)
        self.borrow(borrowing)
