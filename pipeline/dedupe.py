"""Deduplicate: exact copies by content hash, near copies by perceptual hash.

Why three signals: sha256 catches byte-identical uploads for free. pHash (DCT
of a greyscale thumbnail) survives re-encoding, resizing and mild crops; pHash
at 16x16 (256 bits) is a finer second opinion that cuts the 8x8 hash's
false matches. Both are greyscale, so a red and a teal version of one t-shirt
hash alike; a 4x4 colour grid compared cell by cell keeps colour variants
apart, because to a shop they are different products. All three are taken
from the product trimmed off its plain backdrop (``trim_background``), so a
crop that removes backdrop changes nothing and a small product's colour is not
diluted by white.

Rotations: EXIF-rotated copies are hashed upright (decode applies EXIF);
copies whose *pixels* were rotated by 90/180/270 degrees are caught by also
querying the index with the pHash of each rotation.

Scaling: near-duplicate search uses multi-index hashing (Norouzi et al.):
the 64-bit pHash is cut into ``m`` 16-bit blocks; two hashes within Hamming
distance ``r`` agree within ``r // m`` bits on at least one block
(pigeonhole), so a query probes only the buckets within that small radius of
each of its blocks instead of comparing against every kept photo.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image

HASH_BITS = 64
DEFAULT_PHASH_THRESHOLD = 10  # of 64 bits: the index radius
DEFAULT_FINE_THRESHOLD = 36  # of 256 bits: the verification hash
DEFAULT_COLOR_THRESHOLD = 0.12  # max per-cell colour distance, 0..1


@dataclass(frozen=True)
class Hashes:
    """Perceptual fingerprints of one upright RGB image (of its trimmed product).

    ``phash`` (64 bits, 8x8 DCT) is what the index searches; ``fine`` (256
    bits, 16x16 DCT) is the second opinion that tells apart same-design,
    same-colour products (carrot vs orange juice bottles) that agree at 8x8.
    ``rotated`` holds both hashes of the 90/180/270 degree rotations.
    """

    phash: int
    fine: int
    rotated: tuple[tuple[int, int], ...]
    color: np.ndarray  # (4, 4, 3) float32 cell means in 0..1

    @property
    def phash_hex(self) -> str:
        return f"{self.phash:016x}"

    @property
    def fine_hex(self) -> str:
        return f"{self.fine:064x}"


def _bits_to_int(bits: np.ndarray) -> int:
    return int("".join("1" if b else "0" for b in np.asarray(bits).flatten()), 2)


def trim_background(img: Image.Image, tolerance: int = 24, min_fraction: float = 0.05) -> Image.Image:
    """Crop to the bounding box of pixels that differ from the border colour.

    Product photos are an object on a plain backdrop; hashing the object rather
    than the frame makes the fingerprints indifferent to how much backdrop a
    crop or a re-framing left, and keeps a small product's colour from being
    diluted by white. Photos without a plain border are returned unchanged.
    """
    small = img.copy()
    small.thumbnail((256, 256), Image.BILINEAR)
    arr = np.asarray(small, dtype=np.int16)
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    bg = np.median(border, axis=0)
    if np.abs(border - bg).max(axis=1).mean() > tolerance:  # no uniform backdrop
        return img
    mask = np.abs(arr - bg).max(axis=2) > tolerance
    ys, xs = np.nonzero(mask)
    if ys.size < min_fraction * mask.size * 0.1:
        return img
    sx, sy = img.width / small.width, img.height / small.height
    box = (int(xs.min() * sx), int(ys.min() * sy), int(np.ceil((xs.max() + 1) * sx)), int(np.ceil((ys.max() + 1) * sy)))
    if (box[2] - box[0]) * (box[3] - box[1]) < min_fraction * img.width * img.height:
        return img
    return img.crop(box)


def _phash_pair(gray64: np.ndarray) -> tuple[int, int]:
    """(64-bit, 256-bit) pHash of a 64x64 greyscale array (imagehash's algorithm)."""
    img64 = Image.fromarray(gray64)
    fine = _bits_to_int(imagehash.phash(img64, hash_size=16).hash)
    coarse = _bits_to_int(imagehash.phash(img64.resize((32, 32), Image.LANCZOS), hash_size=8).hash)
    return coarse, fine


def compute_hashes(img: Image.Image) -> Hashes:
    """Both pHashes, their rotations and the colour grid of the trimmed product."""
    img = trim_background(img)
    gray64 = np.asarray(img.convert("L").resize((64, 64), Image.LANCZOS))
    phash, fine = _phash_pair(gray64)
    rotated = tuple(_phash_pair(np.rot90(gray64, k).copy()) for k in (1, 2, 3))
    color = np.asarray(img.resize((4, 4), Image.BOX), dtype=np.float32) / 255.0
    return Hashes(phash, fine, rotated, color)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def color_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Largest per-cell RGB distance between two colour grids, scaled to 0..1."""
    return float(np.sqrt(((a - b) ** 2).sum(axis=-1)).max() / np.sqrt(3.0))


class MultiIndexHash:
    """Exact r-neighbour search over 64-bit hashes without comparing all pairs.

    ``m`` tables, one per 64/m-bit block. A query enumerates, for each block,
    every key within ``r // m`` bits of its own block and collects those
    buckets' entries as candidates; candidates are then checked in full.
    Inserting is O(m); a query costs m * C(block_bits, <= r//m) probes plus the
    candidates, independent of how many hashes are stored when buckets are
    sparse (see README, "How dedupe scales").
    """

    def __init__(self, radius: int, blocks: int = 4) -> None:
        if HASH_BITS % blocks:
            raise ValueError("blocks must divide 64")
        self.radius = radius
        self.blocks = blocks
        self.block_bits = HASH_BITS // blocks
        self.sub_radius = radius // blocks
        self._tables: list[dict[int, list[int]]] = [defaultdict(list) for _ in range(blocks)]
        self._hashes: dict[int, int] = {}
        mask = (1 << self.block_bits) - 1
        self._mask = mask
        self._flips = [
            sum(1 << b for b in combo)
            for d in range(self.sub_radius + 1)
            for combo in itertools.combinations(range(self.block_bits), d)
        ]

    def __len__(self) -> int:
        return len(self._hashes)

    def _split(self, h: int) -> list[int]:
        return [(h >> (i * self.block_bits)) & self._mask for i in range(self.blocks)]

    def add(self, key: int, h: int) -> None:
        self._hashes[key] = h
        for table, part in zip(self._tables, self._split(h)):
            table[part].append(key)

    def query(self, h: int) -> list[tuple[int, int]]:
        """All stored (key, distance) within ``radius`` of ``h``, nearest first."""
        seen: set[int] = set()
        hits: list[tuple[int, int]] = []
        for table, part in zip(self._tables, self._split(h)):
            for flip in self._flips:
                for key in table.get(part ^ flip, ()):
                    if key in seen:
                        continue
                    seen.add(key)
                    d = hamming(self._hashes[key], h)
                    if d <= self.radius:
                        hits.append((d, key))
        return [(key, d) for d, key in sorted(hits)]


@dataclass(frozen=True)
class DedupeConfig:
    phash_threshold: int = DEFAULT_PHASH_THRESHOLD
    fine_threshold: int = DEFAULT_FINE_THRESHOLD
    color_threshold: float = DEFAULT_COLOR_THRESHOLD


@dataclass(frozen=True)
class Candidate:
    """What dedupe needs to know about one decodable photo."""

    row: int
    sha256: str
    area: int
    hashes: Hashes


@dataclass(frozen=True)
class Match:
    """``row`` duplicates ``kept``; ``kind`` is ``exact`` or ``near``."""

    row: int
    kept: int
    kind: str
    phash_distance: int = 0


def is_near(a: Hashes, b: Hashes, cfg: DedupeConfig) -> bool:
    """Second-stage check of a pHash candidate: the fine hash and colour must agree."""
    return hamming(a.fine, b.fine) <= cfg.fine_threshold and color_distance(a.color, b.color) <= cfg.color_threshold


def find_duplicates(items: Iterable[Candidate], cfg: DedupeConfig = DedupeConfig()) -> dict[int, Match]:
    """Map each duplicate row to the row it duplicates; rows absent are kept.

    Rule (documented in the README): within a group the kept photo is the one
    with the most pixels, ties going to the row seen first. Photos are visited
    in that priority order and each is matched only against photos already
    kept, so ``duplicate_of`` always points at a kept row (no chains) and the
    result does not depend on the order of equal-priority rows.
    """
    ordered = sorted(items, key=lambda c: (-c.area, c.row))
    by_sha: dict[str, int] = {}
    kept: dict[int, Candidate] = {}
    index = MultiIndexHash(cfg.phash_threshold)
    matches: dict[int, Match] = {}
    for cand in ordered:
        if cand.sha256 in by_sha:
            matches[cand.row] = Match(cand.row, by_sha[cand.sha256], "exact")
            continue
        found = _near_match(cand, index, kept, cfg)
        if found is not None:
            matches[cand.row] = Match(cand.row, found[0], "near", found[1])
            continue
        by_sha[cand.sha256] = cand.row
        kept[cand.row] = cand
        index.add(cand.row, cand.hashes.phash)
    return matches


def _near_match(
    cand: Candidate, index: MultiIndexHash, kept: dict[int, Candidate], cfg: DedupeConfig
) -> tuple[int, int] | None:
    """The best kept photo ``cand`` nearly duplicates, as (row, pHash distance)."""
    h = cand.hashes
    views = [h] + [Hashes(p, f, (), np.rot90(h.color, k)) for k, (p, f) in enumerate(h.rotated, start=1)]
    for view in views:  # upright first, then the pixel rotations
        for key, dist in index.query(view.phash):
            if is_near(view, kept[key].hashes, cfg):
                return key, dist
    return None
