"""Copies the hashes missed, found after classification: the embeddings propose, the aligned check confirms.

Why a second dedupe step after the model: a logo badge over a corner or a crop
of 8% a side moves even the whole photo's 64-bit pHash past the search radius,
so ``dedupe`` never sees such a copy as a candidate, and it gets classified as
a product of its own. The model's pooled features barely move under those
edits (every copy in ``bench/near_duplicates.py`` is at cosine 0.71-1.0 from
its original), and classification computes them anyway. They cannot decide on
their own: distinct products of one design, and recoloured variants, sit at
cosine up to 0.99. So the features only *propose* candidates (cosine at least
``DedupeConfig.embedding_similarity``, among kept photos that share one of the
photo's two most likely categories), and the same aligned check that ``dedupe`` uses
(``aligned_match``: the thumbnails line up pixel for pixel after a crop and a
brightness fit, and pass the colour test) decides. Measured on the bench's
development part: 579 of its 650 copies found before the model, 633 with this
check, no false pair added (README).

The walk mirrors ``dedupe.find_duplicates``: tonight's classified photos in
order of size (most pixels first, then the better encoding, then row), each
matched only against photos already kept (earlier nights with the same model
version, earlier chunks, and larger photos of tonight that stayed kept), most
similar first, so every duplicate points at a kept photo.

Scale: features are projected to ``EMBED_DIM`` dimensions (a fixed random
rotation: cosines move by a few hundredths, the confirmation is the aligned
check) and kept as float16 unit vectors, 256 bytes a photo beside its 3 KB
thumbnail; a chunk is compared with one matrix product per category and
block of kept photos (a photo is listed under two categories), and each photo
goes to the aligned check with its ``COPY_CANDIDATES`` most similar kept
photos only.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np

from pipeline.stages.dedupe import THUMB_SIDE, DedupeConfig, Match, aligned_match, keep_order

EMBED_DIM = 128  # dimensions the features are projected to
SIMILARITY_BLOCK = 32_768  # kept photos compared with a chunk at once (a 2048-photo chunk: 256 MB of float32)
# Candidates a photo is compared with, the most alike first: features do not see colour, so a design sold in
# a hundred colourways would otherwise send every one to the aligned check. Why 4: the near-duplicate bench's
# parts find the same copies with 4 as with 8, and crowded mosaics spent 43 s on the aligned check with 8,
# 26 s with 4 (5,085 photos); a copy's original is nearly always its most alike kept photo.
COPY_CANDIDATES = 4


@functools.lru_cache(maxsize=4)
def _rotation(dim: int) -> np.ndarray:
    """A (dim, EMBED_DIM) matrix with orthonormal columns, seeded: the same every night (earlier nights'
    features are stored unprojected, as int8 codes, and projected when loaded, so only the process that
    compares them needs one matrix)."""
    q, _ = np.linalg.qr(np.random.default_rng(dim).standard_normal((dim, EMBED_DIM)))
    return q.astype(np.float32)


def project(features: np.ndarray) -> np.ndarray:
    """(n, D) model features (float, or int8 codes: a row's scale cancels) → (n, ≤EMBED_DIM) float16 unit
    vectors, comparable by a dot product; in blocks, so a long history never exists as float32 at once."""
    features = np.asarray(features)
    dim = min(features.shape[1], EMBED_DIM)
    out = np.empty((len(features), dim), np.float16)
    for start in range(0, len(features), SIMILARITY_BLOCK):
        x = features[start:start + SIMILARITY_BLOCK].astype(np.float32)
        if x.shape[1] > EMBED_DIM:
            x = x @ _rotation(x.shape[1])
        out[start:start + SIMILARITY_BLOCK] = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return out


@dataclass(frozen=True)
class Photo:
    """What the copy search needs of one classified photo."""

    key: int  # the run's row, or a negative key for a photo kept on an earlier night
    area: int  # pixels: the larger photo is kept
    label: str  # the model's top category
    features: np.ndarray  # (D,) the model's pooled features, or their int8 codes (``store.quantise``)
    thumb: np.ndarray  # (32, 32, 3) uint8 whole-photo thumbnail (``Hashes.thumb``)
    also: tuple[str, ...] = ()  # further categories (its second): kept under and searched in, as ``label``
    fidelity: int = 100  # encoding quality: of two photos with as many pixels, the higher is kept (``find_duplicates``)

    @property
    def categories(self) -> tuple[str, ...]:
        """Where the photo is kept, and where it searches for its originals: its top and its ``also``."""
        return tuple(dict.fromkeys((self.label, *self.also)))


@dataclass
class _Segment:
    keys: np.ndarray  # int64 [n]
    vectors: np.ndarray  # float16 [n, EMBED_DIM]
    slots: np.ndarray  # int64 [n]: rows of the index's thumbnail table


THUMB_BLOCK = 16_384  # thumbnails a block of the index's table holds (48 MB, touched as it fills)


class EmbeddingIndex:
    """Kept, classified photos by category: their projected features, and one table of thumbnails.

    A photo is listed under each of its ``Photo.categories`` (its features
    twice, 256 bytes each; its 3 KB thumbnail once, in blocks filled in
    order). Listings are appended to a pending list and packed into array
    segments when searched; a segment at least as large as the one before it
    is merged into it (as in ``nearpairs.BatchIndex``), so a long history
    stays in a few large arrays and each photo is copied O(log n) times.
    """

    def __init__(self) -> None:
        self._segments: dict[str, list[_Segment]] = defaultdict(list)
        self._pending: dict[str, list[tuple[int, np.ndarray, int]]] = defaultdict(list)
        self._thumbs: list[np.ndarray] = []
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, photo: Photo) -> None:
        """A kept photo (``area`` unused: kept photos stay kept)."""
        block, row = divmod(self._count, THUMB_BLOCK)
        if block == len(self._thumbs):
            self._thumbs.append(np.empty((THUMB_BLOCK, THUMB_SIDE, THUMB_SIDE, 3), np.uint8))
        self._thumbs[block][row] = photo.thumb
        for label in photo.categories:
            self._pending[label].append((photo.key, photo.features, self._count))
        self._count += 1

    def thumbs(self, slots: np.ndarray) -> np.ndarray:
        """The thumbnails in table rows ``slots``."""
        out = np.empty((len(slots), THUMB_SIDE, THUMB_SIDE, 3), np.uint8)
        block, row = np.divmod(slots, THUMB_BLOCK)
        for b in np.unique(block):
            mine = block == b
            out[mine] = self._thumbs[b][row[mine]]
        return out

    def segments(self, label: str) -> list[_Segment]:
        """The kept photos listed under one category, packed."""
        pending = self._pending.pop(label, [])
        segs = self._segments[label]
        if pending:
            keys, features, slots = zip(*pending)
            new = _Segment(np.array(keys, np.int64), project(np.stack(features)), np.array(slots, np.int64))
            while segs and len(segs[-1].keys) <= len(new.keys):
                old = segs.pop()
                new = _Segment(*(np.concatenate([getattr(old, f.name), getattr(new, f.name)]) for f in fields(_Segment)))
            segs.append(new)
        return segs


def categories_of(probs: np.ndarray, categories: Sequence[str]) -> list[tuple[str, tuple[str, ...]]]:
    """Per photo (rows of ``probs``), its most likely category and its second: the copy check compares
    only photos that share one of them (``Photo.categories``), since a badge or a crop can swap a photo's
    two most likely categories, or put the original's second first."""
    if probs.ndim != 2 or not len(probs):
        return []
    top = np.argsort(-probs, axis=1, kind="stable")[:, :2]
    return [(categories[row[0]], tuple(categories[j] for j in row[1:])) for row in top]


def classified_photos(keys: Sequence[int], areas: Sequence[int], thumbs: Sequence[np.ndarray], probs: np.ndarray,
                      features: np.ndarray, categories: Sequence[str], fidelities: Sequence[int]) -> list[Photo]:
    """The copy check's photos for classified rows (aligned sequences; ``fidelities``: ``Scan.fidelity``), each
    with its two most likely categories (``categories_of``). One place, so the runners and the benches
    that measure them build the same photos."""
    return [Photo(key, area, label, feats, thumb, also, fidelity) for key, area, thumb, feats, (label, also), fidelity
            in zip(keys, areas, thumbs, features, categories_of(probs, categories), fidelities, strict=True)]


def _similar(queries: np.ndarray, kept: np.ndarray, threshold: float, limit: int,
             walk: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query index, kept index, cosine) of pairs at least ``threshold`` alike, at most ``limit`` per query
    and block of kept photos (the most alike); ``walk``: the queries' and the kept photos' positions in
    tonight's walk, and only a kept photo before its query counts."""
    q = queries.astype(np.float32)
    found = [(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))]
    for start in range(0, len(kept), SIMILARITY_BLOCK):
        sims = q @ kept[start:start + SIMILARITY_BLOCK].astype(np.float32).T
        if walk is not None:
            sims[walk[1][None, start:start + SIMILARITY_BLOCK] >= walk[0][:, None]] = -np.inf
        hit = sims >= threshold
        crowded = np.flatnonzero(hit.sum(axis=1) > limit)  # a design in many colourways: its nearest only
        if len(crowded):
            top = np.zeros((len(crowded), sims.shape[1]), bool)
            np.put_along_axis(top, np.argpartition(sims[crowded], -limit, axis=1)[:, -limit:], True, axis=1)
            hit[crowded] &= top
        i, j = np.nonzero(hit)
        found.append((i, j + start, sims[i, j]))
    return tuple(np.concatenate(parts) for parts in zip(*found))  # type: ignore[return-value]


def _nearest(query: np.ndarray, keys: np.ndarray, sims: np.ndarray, limit: int) -> np.ndarray:
    """Indices of the ``limit`` most similar candidates of each query (ties: the lower key), in that order."""
    order = np.lexsort((keys, -sims, query))
    first = np.searchsorted(query[order], query[order], side="left")
    return order[np.arange(len(order)) - first < limit]


def find_copies(photos: list[Photo], index: EmbeddingIndex | None = None,
                cfg: DedupeConfig = DedupeConfig()) -> dict[int, Match]:
    """Map each of ``photos`` that copies a kept photo (in ``index``, or larger among ``photos``) to it.

    The rule is in the module docstring. A photo's candidates are tried most
    similar first (ties: the lowest key); photos kept on earlier nights or in
    earlier chunks stay kept whatever their size. The caller adds the photos
    that stay kept to ``index`` once their rows are final (a reviewer's
    correction may still make one a duplicate), from the same records a
    resumed run reads back, so both see the same index.
    """
    index = index if index is not None else EmbeddingIndex()
    order = sorted(photos, key=lambda p: keep_order(p.area, p.fidelity, p.key))
    if not order:
        return {}
    tonight = {p.key for p in order}
    listed: dict[str, list[int]] = defaultdict(list)  # category -> walk positions of tonight's photos under it
    for n, p in enumerate(order):
        for label in p.categories:
            listed[label].append(n)
    vectors = project(np.stack([p.features for p in order]))
    thumbs = np.stack([p.thumb for p in order])
    order_keys = np.array([p.key for p in order], np.int64)
    found = []  # (walk position, kept key, cosine, thumbnail row in the index or -1-n for tonight's n)
    for label, members in listed.items():
        idx = np.array(members)
        for seg in index.segments(label):
            i, j, sim = _similar(vectors[idx], seg.vectors, cfg.embedding_similarity, COPY_CANDIDATES)
            found.append((idx[i], seg.keys[j], sim, seg.slots[j]))
        i, j, sim = _similar(vectors[idx], vectors[idx], cfg.embedding_similarity, COPY_CANDIDATES, walk=(idx, idx))
        found.append((idx[i], order_keys[idx[j]], sim, -1 - idx[j]))
    query, keys, sims, slots = (np.concatenate(parts) for parts in zip(*found))
    if not len(query):
        return {}
    _, once = np.unique(np.stack([query, keys]), axis=1, return_index=True)  # listed together twice: one pair
    pick = once[_nearest(query[once], keys[once], sims[once], COPY_CANDIDATES)]
    query, keys, sims, slots = query[pick], keys[pick], sims[pick], slots[pick]
    kept_thumbs = np.empty((len(query), *thumbs.shape[1:]), np.uint8)
    mine = slots < 0
    kept_thumbs[mine], kept_thumbs[~mine] = thumbs[-1 - slots[mine]], index.thumbs(slots[~mine])
    # both ways: the brightness fit and the agreement's tolerance are taken from one side, and a badge
    # or a crop scores differently seen from each (dev part: 471 copies one way, 475 both)
    ok = (aligned_match(thumbs[query], kept_thumbs, cfg.color_threshold, cfg.align_agreement, cfg.align_overlap)
          | aligned_match(kept_thumbs, thumbs[query], cfg.color_threshold, cfg.align_agreement, cfg.align_overlap))
    tried: dict[int, list[tuple[float, int]]] = defaultdict(list)  # walk position -> confirmed (−cosine, key)
    for n, key, sim in zip(query[ok].tolist(), keys[ok].tolist(), sims[ok].tolist()):
        tried[n].append((-sim, key))
    matches: dict[int, Match] = {}
    for n, p in enumerate(order):
        for _, key in sorted(tried.get(n, ())):
            if key not in tonight or key not in matches:  # kept before tonight, or kept in tonight's walk
                matches[p.key] = Match(p.key, key, "near")
                break
    return matches
