"""Copies the hashes missed, found after classification: the embeddings propose, the aligned check confirms.

Why a second dedupe step after the model: a logo badge over a corner or a crop
of 8% a side moves even the whole photo's 64-bit pHash past the search radius,
so ``dedupe`` never sees such a copy as a candidate, and it gets classified as
a product of its own. The model's pooled features barely move under those
edits (every copy in ``bench/near_duplicates.py`` is at cosine 0.71-1.0 from
its original), and classification computes them anyway. They cannot decide on
their own: distinct products of one design, and recoloured variants, sit at
cosine up to 0.99. So the features only *propose* candidates (cosine at least
``DedupeConfig.embedding_similarity``, among kept photos whose top category
is the photo's first or second), and the same aligned check that ``dedupe`` uses
(``aligned_match``: the thumbnails line up pixel for pixel after a crop and a
brightness fit, and pass the colour test) decides. Measured on the bench's
development part: 579 of its 650 copies found before the model, 633 with this
check, no false pair added (README).

The walk mirrors ``dedupe.find_duplicates``: tonight's classified photos in
order of size (largest first, then row), each matched only against photos
already kept (earlier nights with the same model version, earlier chunks, and
larger photos of tonight that stayed kept), most similar first, so every
duplicate points at a kept photo.

Scale: features are projected to ``EMBED_DIM`` dimensions (a fixed random
rotation: cosines move by a few hundredths, the confirmation is the aligned
check) and kept as float16 unit vectors, 256 bytes a photo beside its 3 KB
thumbnail; a chunk is compared with one matrix product per top category and
block of kept photos, and each photo goes to the aligned check with its
``COPY_CANDIDATES`` most similar kept photos only.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np

from pipeline.stages.dedupe import DedupeConfig, Match, aligned_match

EMBED_DIM = 128  # dimensions the features are projected to
SIMILARITY_BLOCK = 32_768  # kept photos compared with a chunk at once (a 2048-photo chunk: 256 MB of float32)
# Candidates a photo is compared with, the most alike first: features do not see colour, so a design sold in
# a hundred colourways would otherwise send every one to the aligned check.
COPY_CANDIDATES = 8


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
    label: str  # the model's top category: where the photo is kept, and searched for its originals
    features: np.ndarray  # (D,) the model's pooled features, or their int8 codes (``store.quantise``)
    thumb: np.ndarray  # (32, 32, 3) uint8 whole-photo thumbnail (``Hashes.thumb``)
    also: tuple[str, ...] = ()  # further categories whose kept photos it is compared with (its second)


@dataclass
class _Segment:
    keys: np.ndarray  # int64 [n]
    vectors: np.ndarray  # float16 [n, EMBED_DIM]
    thumbs: np.ndarray  # uint8 [n, 32, 32, 3]


class EmbeddingIndex:
    """Kept, classified photos by top category: their projected features and thumbnails.

    Photos are appended to a pending list and packed into array segments when
    searched; a segment at least as large as the one before it is merged into
    it (as in ``nearpairs.BatchIndex``), so a long history stays in a few
    large arrays and each photo is copied O(log n) times.
    """

    def __init__(self) -> None:
        self._segments: dict[str, list[_Segment]] = defaultdict(list)
        self._pending: dict[str, list[Photo]] = defaultdict(list)
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, photo: Photo) -> None:
        """A kept photo (``area`` unused: kept photos stay kept)."""
        self._pending[photo.label].append(photo)
        self._count += 1

    def segments(self, label: str) -> list[_Segment]:
        """The kept photos of one top category, packed."""
        pending = self._pending.pop(label, [])
        segs = self._segments[label]
        if pending:
            new = _Segment(np.array([p.key for p in pending], np.int64), project(np.stack([p.features for p in pending])),
                           np.stack([p.thumb for p in pending]))
            while segs and len(segs[-1].keys) <= len(new.keys):
                old = segs.pop()
                new = _Segment(*(np.concatenate([getattr(old, f.name), getattr(new, f.name)]) for f in fields(_Segment)))
            segs.append(new)
        return segs


def categories_of(probs: np.ndarray, categories: Sequence[str]) -> list[tuple[str, tuple[str, ...]]]:
    """Per photo (rows of ``probs``), the category it is kept under (its most likely) and the one more it
    searches for its originals (its second): a badge or a crop can swap a photo's two most likely
    categories, and the copy check compares only photos that share one."""
    if probs.ndim != 2 or not len(probs):
        return []
    top = np.argsort(-probs, axis=1, kind="stable")[:, :2]
    return [(categories[row[0]], tuple(categories[j] for j in row[1:])) for row in top]


def classified_photos(keys: Sequence[int], areas: Sequence[int], thumbs: Sequence[np.ndarray], probs: np.ndarray,
                      features: np.ndarray, categories: Sequence[str]) -> list[Photo]:
    """The copy check's photos for classified rows (aligned sequences): each kept under its most likely
    category and searching its second too (``categories_of``). One place, so the runners and the benches
    that measure them build the same photos."""
    return [Photo(key, area, label, feats, thumb, also) for key, area, thumb, feats, (label, also)
            in zip(keys, areas, thumbs, features, categories_of(probs, categories))]


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
    order = sorted(photos, key=lambda p: (-p.area, p.key))
    tonight = {p.key for p in photos}
    tried: dict[int, list[tuple[float, int]]] = defaultdict(list)  # walk position -> confirmed (−cosine, key)
    kept_in: dict[str, list[int]] = defaultdict(list)  # category -> walk positions of tonight's photos kept there
    asked: dict[str, list[int]] = defaultdict(list)  # category -> walk positions of the photos that search it
    for n, p in enumerate(order):
        kept_in[p.label].append(n)
        for label in dict.fromkeys((p.label, *p.also)):
            asked[label].append(n)
    if not order:
        return {}
    vectors = project(np.stack([p.features for p in order]))
    thumbs = np.stack([p.thumb for p in order])
    for label, askers in asked.items():
        idx, members = np.array(askers), np.array(kept_in.get(label, []), int)
        segs = index.segments(label)
        found = [(*_similar(vectors[idx], seg.vectors, cfg.embedding_similarity, COPY_CANDIDATES), s)
                 for s, seg in enumerate(segs)]
        found.append((*_similar(vectors[idx], vectors[members], cfg.embedding_similarity, COPY_CANDIDATES,
                                walk=(idx, members)), -1))
        query = np.concatenate([i for i, _, _, _ in found])
        at = np.concatenate([j for _, j, _, _ in found])
        sims = np.concatenate([sim for _, _, sim, _ in found])
        source = np.concatenate([np.full(len(i), s) for i, _, _, s in found])
        keys = np.empty(len(query), np.int64)
        kept_thumbs = np.empty((len(query), *thumbs.shape[1:]), np.uint8)
        for s, seg in enumerate(segs):
            mine = source == s
            keys[mine], kept_thumbs[mine] = seg.keys[at[mine]], seg.thumbs[at[mine]]
        own = source == -1
        keys[own], kept_thumbs[own] = [order[n].key for n in members[at[own]]], thumbs[members[at[own]]]
        pick = _nearest(query, keys, sims, COPY_CANDIDATES)
        query, keys, sims, kept_thumbs = query[pick], keys[pick], sims[pick], kept_thumbs[pick]
        if not len(query):
            continue
        # both ways: the brightness fit and the agreement's tolerance are taken from one side, and a badge
        # or a crop scores differently seen from each (dev part: 471 copies one way, 475 both)
        query_thumbs = thumbs[idx[query]]
        ok = (aligned_match(query_thumbs, kept_thumbs, cfg.color_threshold, cfg.align_agreement, cfg.align_overlap)
              | aligned_match(kept_thumbs, query_thumbs, cfg.color_threshold, cfg.align_agreement, cfg.align_overlap))
        for n, key, sim in zip(idx[query[ok]].tolist(), keys[ok].tolist(), sims[ok].tolist()):
            tried[n].append((-sim, key))
    matches: dict[int, Match] = {}
    for n, p in enumerate(order):
        for _, key in sorted(tried.get(n, ())):
            if key not in tonight or key not in matches:  # kept before tonight, or kept in tonight's walk
                matches[p.key] = Match(p.key, key, "near")
                break
    return matches
