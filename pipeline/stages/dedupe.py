"""Deduplicate: exact copies by content hash, near copies by perceptual hash.

Why three signals: sha256 catches byte-identical uploads for free. pHash (DCT
of a greyscale thumbnail) survives re-encoding, resizing and mild crops; pHash
at 16x16 (256 bits) is a finer second opinion that cuts the 8x8 hash's
false matches. Both are greyscale, so a red and a teal version of one t-shirt
hash alike; a 4x4 colour grid compared cell by cell keeps colour variants
apart, because to a shop they are different products. All three are taken
from the product trimmed off its plain backdrop (``trim_box``), so a
crop that removes backdrop changes nothing and a small product's colour is not
diluted by white.

Rotations and mirrors: EXIF-rotated copies are hashed upright (decode applies
EXIF); copies whose *pixels* were rotated by 90/180/270 degrees, or mirrored
left to right (a shop flipping a photo so the product faces the page), are
caught by also querying the index with the hashes of each such view.

Crops and overlays: the whole, untrimmed photo's pHash is searched too (an
overlay moves the trimmed box), and among the kept photos' inner pHashes (their
centre, ``INNER_CROP`` cut off each side: what a cropped copy looks like whole);
a 32x32 thumbnail then decides by aligning the pixels (``aligned_match``).

Scaling: near-duplicate search uses multi-index hashing (Norouzi et al.):
the 64-bit pHash is cut into ``m`` blocks; two hashes within Hamming distance
``r`` agree within ``r // m`` bits on at least one block (pigeonhole), so a
query probes only the buckets within that small radius of each of its blocks
instead of comparing against every kept photo. ``m`` is chosen from a cost
model as the collection grows.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image

from pipeline.ops.device import cpu_count
from pipeline.stages.decode import trim_box

HASH_BITS = 64
DEFAULT_PHASH_THRESHOLD = 10  # of 64 bits: the index radius
DEFAULT_FINE_THRESHOLD = 36  # of 256 bits: the verification hash
CLOSE_PHASH = 4  # of 64 bits: a candidate this close...
CLOSE_FINE_THRESHOLD = 48  # ...may be this far apart in the verification hash (crops into the product)
DEFAULT_COLOR_THRESHOLD = 10.0  # CIELAB units: colour_distance of a copy (re-encoded, brighter, overlaid) stays under it
THUMB_SIDE = 32  # px: the whole photo's RGB thumbnail kept for the aligned check (3 KB a photo)
ALIGN_SIDE = 24  # px: the aligned check compares regions resampled to this side
ALIGN_CROPS = (0.0, 0.02, 0.04, 0.06, 0.08, 0.10, 0.12)  # share cut off each side of one photo
ALIGN_BLUR = 0.5  # px (of ALIGN_SIDE): the Gaussian both sides of a crop comparison are seen through
DEFAULT_ALIGN_AGREEMENT = 0.90  # share of the product's pixels that must agree once aligned
DEFAULT_ALIGN_OVERLAP = 0.5  # intersection over union of the two products' silhouettes
# A badge or logo stamped near an edge (up to ~10% of the photo, plus its blur at 24 px): (rows, columns)
# of the windows of the aligned frame that may be left out, when they touch its border...
OVERLAY_WINDOWS = ((7, 12), (12, 7), (9, 9))
OVERLAY_AGREEMENT = 0.95  # ...and the product's pixels outside the window then agree this much
# ...and the window hides at most this share of the product: an 8-10% badge over a product that fills a quarter
# of the photo (a tape measure, scissors on white, a photo framed off-centre) hides up to a third of it
OVERLAY_HIDES = 1 / 3
# ...where the window holds colour that the other photo lacks there (mean CIELAB a*b* this far apart), the
# brightness fit is redone without it too: a badge over a dress model's head otherwise skews the fit for all
OVERLAY_CHROMA = 20.0
DEFAULT_EMBEDDING_SIMILARITY = 0.75  # cosine of projected features from which a classified photo is a candidate copy
# the most a tone curve may bend (its quadratic term, in grey levels over the levels scaled to [-1, 1]) per
# grey level of difference between the two photos' mean brightness (``_brightness_agreement``)
BEND_PER_LEVEL = 4.0
BRIGHTER_LEVELS = 8.0  # ...and only where one photo is this much brighter on average (15% is about 20 levels)
BEND_FROM = 0.75  # ...and the straight line's agreement is this high already
WHITE_LEVEL = 250.0  # a level from which brightening has stopped a pixel's channel at white (``_brightened``)
CLIPPED_MORE = 0.01  # share of levels the brighter photo has at white beyond the darker's
BRIGHTEN_GAINS = (1.05, 1.4)  # gains through black a brightened copy is fitted with
BACKDROP_LEVEL = 12.0  # grey levels from the backdrop from which a pixel belongs to the product
BACKDROP_TILT_GAIN = 0.2  # share of the border a tilted backdrop must explain beyond a flat one (``_product``)
# The views (of ``VIEW_NAMES``) in which the whole photo's pHash is searched: upright and mirrored. Why not all
# five: searched in every view, the second table doubled the search against a long history
# (bench/dedupe_history.py); the mirror adds one query in seven. Turned copies are left to the trimmed hashes;
# mirrored ones whose trimmed box moved (a tool on white mirrored against its re-encoded copy, 12-16 bits
# apart trimmed, 0-2 whole) were missed.
WHOLE_VIEWS = (0, 4)
# Share cut off each side of a photo for its inner pHash (``Hashes.inner``): halfway between the 4% and 8%
# crops of the near-duplicate bench, so both come within the radius (development and GCompris parts: every
# 4% crop's whole pHash within 10 bits of its original's whole or inner one, and 130 of 134 8% crops; by the
# whole one alone 105 and 20)
INNER_CROP = 0.06
# The views in which a photo's whole pHash is searched among the kept photos' inner ones: upright only. The
# third bucket table costs a long history's search a query a view (bench/dedupe_history.py, 10,000 photos
# against 1,000,000: upright only 7.2-8.7 s to decide against 6.6-7.1 s without it, alternated; upright and
# mirrored 9.3 s in one noisy run), and a crop that is mirrored as well is rarer than either.
INNER_VIEWS = (0,)


@dataclass(frozen=True)
class Hashes:
    """Perceptual fingerprints of one upright RGB image (of its trimmed product).

    ``phash`` (64 bits, 8x8 DCT) is what the index searches; ``fine`` (256
    bits, 16x16 DCT) is the second opinion that tells apart same-design,
    same-colour products (carrot vs orange juice bottles) that agree at 8x8.
    ``rotated`` holds both hashes of the other views a copy may take: the
    90/180/270 degree rotations, then the left-right mirror (``VIEW_NAMES``;
    photos indexed before mirrors were checked have only the rotations).

    ``whole`` (the 64-bit pHash of the *untrimmed* photo in each view) and
    ``thumb`` (the untrimmed photo as a 32x32 RGB thumbnail) feed the aligned
    check (``aligned_match``): an overlay or a brightness change moves the
    trimmed box, so the trimmed hashes of such copies drift, while the whole
    photo's do not. Photos indexed before they were kept have neither.

    ``inner`` (the 64-bit pHash of the upright photo's centre, ``INNER_CROP``
    cut off each side) is what a cropped copy's whole photo looks like: the
    index searches a photo's ``whole`` among the kept photos' ``inner`` too, so
    crops of 4-8% a side, 12-30 bits from their original whole and trimmed
    (past the radius), reach the aligned check before the model. Photos
    indexed before it was kept have none.
    """

    phash: int
    fine: int
    rotated: tuple[tuple[int, int], ...]
    color: np.ndarray  # (4, 4, 3) float32 cell means in 0..1
    whole: tuple[int, ...] = ()  # one 64-bit pHash per view, or () for photos indexed before
    thumb: np.ndarray | None = None  # (32, 32, 3) uint8, upright
    inner: int | None = None  # 64-bit pHash of the upright photo's centre, ``INNER_CROP`` cut off each side

    @property
    def phash_hex(self) -> str:
        return f"{self.phash:016x}"

    @property
    def fine_hex(self) -> str:
        return f"{self.fine:064x}"

    def to_fields(self) -> dict:
        """Plain columns (hex strings, flat floats, raw bytes) for Parquet files and Ray batches."""
        return {"phash": self.phash_hex, "phash256": self.fine_hex,
                "rotated": [f"{p:016x}:{f:064x}" for p, f in self.rotated],
                "color": self.color.astype(np.float32).ravel().tolist(),
                "phash_whole": [f"{p:016x}" for p in self.whole],
                "thumb": None if self.thumb is None else self.thumb.tobytes(),
                "phash_inner": None if self.inner is None else f"{self.inner:016x}"}

    @classmethod
    def from_fields(cls, r: dict) -> "Hashes":
        """Inverse of ``to_fields`` (records written before the whole-photo or inner fields have none)."""
        rotated = tuple((int(p, 16), int(f, 16)) for p, f in (x.split(":") for x in r["rotated"]))
        thumb = r.get("thumb")
        return cls(int(r["phash"], 16), int(r["phash256"], 16), rotated,
                   np.asarray(r["color"], np.float32).reshape(4, 4, 3),
                   tuple(int(p, 16) for p in r.get("phash_whole") or ()),
                   np.frombuffer(thumb, np.uint8).reshape(THUMB_SIDE, THUMB_SIDE, 3) if thumb else None,
                   int(r["phash_inner"], 16) if r.get("phash_inner") else None)

    def view(self, k: int) -> "Hashes":
        """This photo as seen in ``VIEW_NAMES[k]``: that view's hashes, colour grid and thumbnail."""
        if k == 0:
            return self
        p, f = self.rotated[k - 1]
        return Hashes(p, f, (), view_of(self.color, k), (self.whole[k],) if self.whole else (),
                      None if self.thumb is None else np.ascontiguousarray(view_of(self.thumb, k)))


VIEW_NAMES = ("upright", "rotated 90", "rotated 180", "rotated 270", "mirrored")


def _bits_to_int(bits: np.ndarray) -> int:
    """Boolean bits (a multiple of 8, first bit most significant) as an integer, packed in C: a Python
    loop over 256 bits cost more than the DCT that made them."""
    flat = np.asarray(bits, bool).ravel()
    assert flat.size % 8 == 0, flat.size
    return int.from_bytes(np.packbits(flat).tobytes(), "big")


def _low_dct(pixels: np.ndarray, size: int) -> np.ndarray:
    """The ``size`` x ``size`` lowest frequencies of the 2-D DCT-II of a square greyscale array (pHash's)."""
    from scipy.fftpack import dct

    return dct(dct(pixels.astype(np.float64), axis=0), axis=1)[:size, :size]


def _view_dct(low: np.ndarray, view: int) -> np.ndarray:
    """The low DCT block of the pixels seen in ``VIEW_NAMES[view]``, from the upright block.

    Why no second transform: mirroring an axis multiplies DCT-II coefficient k
    by (-1)^k, and a transpose transposes the block, so every view's pHash
    comes from the one DCT (exactly what imagehash computes on the turned
    pixels, four DCTs saved per hash size).
    """
    sign = (-1.0) ** np.arange(low.shape[0])
    if view == 1:  # np.rot90 once: transpose, then flip rows
        return low.T * sign[:, None]
    if view == 2:
        return low * sign[:, None] * sign[None, :]
    if view == 3:  # three quarter turns: transpose, then flip columns
        return low.T * sign[None, :]
    if view == 4:  # mirror: flip columns
        return low * sign[None, :]
    return low


def _view_bits(low: np.ndarray, views: Iterable[int] = range(len(VIEW_NAMES))) -> list[int]:
    """The pHash of each of ``views`` (``VIEW_NAMES``; all five by default) of an upright low DCT block: each
    view's coefficients above their own median. One median call for the five views (per call, numpy's
    overhead outweighs the work on 64 or 256 values); the same bits as a median per view."""
    blocks = np.stack([_view_dct(low, v) for v in views])
    medians = np.median(blocks.reshape(len(blocks), -1), axis=1)
    return [_bits_to_int(b > m) for b, m in zip(blocks, medians)]


def _coarse_views(gray32: np.ndarray) -> tuple[int, ...]:
    """The 64-bit pHash of each view of a 32x32 greyscale array (the DCT pHash takes its 8x8 corner at
    this size anyway, so the thumbnail's own greyscale serves: no second resize of the photo)."""
    return tuple(_view_bits(_low_dct(gray32, 8)))


def _phash_views(gray64: np.ndarray) -> list[tuple[int, int]]:
    """(64-bit, 256-bit) pHash of each view (``VIEW_NAMES``) of a 64x64 greyscale array.

    The same bits as imagehash's ``phash`` (hash_size 8 on the array resized to
    32 px with Lanczos, and hash_size 16 on it as is), for the upright array and
    for its rotations and mirror.
    """
    coarse = _coarse_views(np.asarray(Image.fromarray(gray64).resize((32, 32), Image.LANCZOS)))
    return list(zip(coarse, _view_bits(_low_dct(gray64, 16))))


def view_of(grid: np.ndarray, view: int) -> np.ndarray:
    """A (..., H, W, C) colour grid as seen in ``VIEW_NAMES[view]`` (numpy's turns and flips)."""
    return np.flip(grid, axis=-2) if view == 4 else np.rot90(grid, view, axes=(-3, -2))


def compute_hashes(img: Image.Image, grey: Image.Image | None = None) -> Hashes:
    """Both pHashes, those of the other views (rotations, mirror) and the colour grid of the trimmed product;
    the whole photo's pHash views, inner pHash and thumbnail. ``grey``: ``img.convert("L")`` when the caller has it
    already (the scan's quality check needs it too); the product's greyscale is cut from it."""
    img = img if img.mode == "RGB" else img.convert("RGB")
    small = img.resize((THUMB_SIDE, THUMB_SIDE), Image.BOX)
    grey32 = small.convert("L")
    thumb, whole = np.asarray(small, np.uint8), _coarse_views(np.asarray(grey32))
    # the centre resampled from the thumbnail: a pHash keeps the 8x8 lowest frequencies, which 32 px still
    # hold (as near the crops of the near-duplicate bench as from the full photo, 0.05 ms against 0.36)
    cut = THUMB_SIDE * INNER_CROP
    centre = grey32.resize((THUMB_SIDE, THUMB_SIDE), Image.BILINEAR, box=(cut, cut, THUMB_SIDE - cut, THUMB_SIDE - cut))
    (inner,) = _view_bits(_low_dct(np.asarray(centre), 8), views=(0,))
    box = trim_box(img)
    grey = grey if grey is not None else img.convert("L")  # per pixel: cropping before or after is the same
    if box is not None:
        img, grey = img.crop(box), grey.crop(box)
    gray64 = np.asarray(grey.resize((64, 64), Image.LANCZOS))
    (phash, fine), *rotated = _phash_views(gray64)
    color = np.asarray(img.resize((4, 4), Image.BOX), dtype=np.float32) / 255.0
    return Hashes(phash, fine, tuple(rotated), color, whole, thumb, inner)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


CHROMATIC = 8.0  # CIELAB chroma from which a cell has a hue worth comparing
CHROMA_LOSS_SCALE = 20.0  # colour_distance units per share of chroma lost (all of it: 20)


_LEVELS = np.arange(256) / 255.0
_LINEAR = np.where(_LEVELS > 0.04045, ((_LEVELS + 0.055) / 1.055) ** 2.4, _LEVELS / 12.92).astype(np.float32)
_XYZ = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
_WHITE = np.array([0.95047, 1.0, 1.08883])


def _chromaticity(rgb: np.ndarray) -> np.ndarray:
    """CIELAB a* and b* of (..., 3) 8-bit levels, as ``lab`` gives them, as (2, ...) float32 through a table
    of the 256 linearised levels: the overlay search takes them of thousands of thumbnails a second."""
    f = _LINEAR[np.clip(rgb, 0, 255).astype(np.uint8)] @ (_XYZ / _WHITE[:, None]).T.astype(np.float32)
    f = np.where(f > 0.008856, np.cbrt(f), 7.787 * f + 16.0 / 116.0)
    return np.stack([500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])])


def _chroma(rgb: np.ndarray) -> np.ndarray:
    """CIELAB chroma of (..., 3) 8-bit levels (``_chromaticity``'s length)."""
    return np.hypot(*_chromaticity(rgb))


def lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in 0..1 (..., 3) → CIELAB (D65)."""
    rgb = np.clip(rgb, 0.0, 1.0)
    lin = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    f = lin @ _XYZ.T / _WHITE
    f = np.where(f > 0.008856, np.cbrt(f), 7.787 * f + 16.0 / 116.0)
    return np.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])], axis=-1)


def _masked_median(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Median over the last two axes of ``values`` where ``mask`` holds (0 where it never does)."""
    flat = (*values.shape[:-2], values.shape[-2] * values.shape[-1])
    ranked = np.sort(np.where(mask, values, np.inf).reshape(flat), axis=-1)  # masked cells first, ascending
    n = mask.reshape(flat).sum(axis=-1)
    lo = np.take_along_axis(ranked, np.maximum((n - 1) // 2, 0)[..., None], axis=-1)[..., 0]
    hi = np.take_along_axis(ranked, np.maximum(n // 2, 0)[..., None], axis=-1)[..., 0]
    return np.where(n > 0, (np.where(np.isinf(lo), 0, lo) + np.where(np.isinf(hi), 0, hi)) / 2, 0.0)


def color_distance(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
    """How differently two colour grids (..., 4, 4, 3) are coloured, in CIELAB units.

    The largest of four medians, so that a watermark or logo over a few
    cells, or a 15% brightness change, does not hide a copy:
    - over the cells where either grid has colour (chroma >= 8), the distance
      in the a*b* plane (a strong hue turn or a greyscale copy moves every
      coloured cell), and the share of chroma lost, times 20 (a greyscale
      copy of a pale article loses all of its little colour: 20; copies lose
      at most a third: 6.4);
    - over the cells where both have colour, the turn of the hue angle in
      degrees: a pale or dark article turned by 30 degrees moves little in
      a*b* (its chroma is small) but its hue turns all the same, while
      re-encoding and brightness leave hue angles alone;
    - half the lightness difference over all cells (black vs white articles).
    Measured (``bench/near_duplicates.py``, development part): copies of
    every kind score at most 7.6 (hue turns at most 6 degrees); visible hue
    turns at least 13. One pair gives a scalar; stacked pairs (the batch pair
    search) one each. ``where`` (..., H, W) limits every median to those
    cells (the aligned check: the product's pixels, not the backdrop).
    """
    la, lb = lab(np.asarray(a, np.float64)), lab(np.asarray(b, np.float64))
    ca, cb = np.hypot(la[..., 1], la[..., 2]), np.hypot(lb[..., 1], lb[..., 2])
    dab = np.hypot(la[..., 1] - lb[..., 1], la[..., 2] - lb[..., 2])
    turn = np.degrees(np.abs(np.angle(np.exp(1j * (np.arctan2(la[..., 2], la[..., 1]) - np.arctan2(lb[..., 2], lb[..., 1]))))))
    cells = np.ones(la.shape[:-1], bool) if where is None else where
    coloured = (np.maximum(ca, cb) >= CHROMATIC) & cells
    median_ab = _masked_median(dab, coloured)
    median_loss = _masked_median(np.abs(ca - cb) / np.maximum(np.maximum(ca, cb), 1e-9), coloured) * CHROMA_LOSS_SCALE
    median_turn = _masked_median(turn, (np.minimum(ca, cb) >= CHROMATIC) & cells)
    median_l = _masked_median(np.abs(la[..., 0] - lb[..., 0]), cells)
    return np.maximum.reduce([median_ab, median_loss, median_turn, median_l / 2.0])


def _resample_matrix(crop: float, src: int = THUMB_SIDE, dst: int = ALIGN_SIDE) -> np.ndarray:
    """(dst, src) weights that cut ``crop`` off both ends of a ``src``-pixel axis and resample it to ``dst``
    pixels with a triangle filter widened to the step (antialiased, like Pillow's bilinear resize)."""
    lo, step = crop * src, (1.0 - 2.0 * crop) * src / dst
    centres = lo + (np.arange(dst) + 0.5) * step
    support = max(step, 1.0)
    w = np.maximum(0.0, 1.0 - np.abs(np.arange(src)[None, :] + 0.5 - centres[:, None]) / support)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def _blur_matrix(sigma: float, side: int = ALIGN_SIDE) -> np.ndarray:
    """(side, side) weights of a Gaussian blur along one axis, the edges mirrored."""
    offsets = np.arange(-2, 3)
    kernel = np.exp(-offsets ** 2 / (2.0 * sigma ** 2))
    kernel /= kernel.sum()
    out = np.zeros((side, side))
    for i in range(side):
        for d, k in zip(offsets, kernel):
            j = i + d
            out[i, -j - 1 if j < 0 else 2 * side - j - 1 if j >= side else j] += k
    return out


_BLUR = _blur_matrix(ALIGN_BLUR)
# each crop's resampling, and the whole photo's; the crop comparisons see both sides through a slight blur (the
# cut side is resampled twice, the copy's whole photo once: they differ at every sharp edge, a crop of 8% agreed
# on 85-89% of its pixels), so index 0 is the whole photo unblurred, 1.. the crops blurred, and the last the
# whole photo blurred: (crops + 1, ALIGN_SIDE, THUMB_SIDE)
_CROP_MATRICES = np.stack([_resample_matrix(0.0), *[_BLUR @ _resample_matrix(c) for c in ALIGN_CROPS[1:]],
                           _BLUR @ _resample_matrix(0.0)]).astype(np.float32)
# the comparisons tried: the two whole photos, then one photo cut by each crop against the other whole, both ways
_WHOLE_BLURRED = len(ALIGN_CROPS)
_PAIRS_A = np.array([0, *range(1, len(ALIGN_CROPS)), *[_WHOLE_BLURRED] * (len(ALIGN_CROPS) - 1)])
_PAIRS_B = np.array([0, *[_WHOLE_BLURRED] * (len(ALIGN_CROPS) - 1), *range(1, len(ALIGN_CROPS))])
ALIGN_BATCH = 128  # pairs compared at once (about 7.5 MB of float32 temporaries: they stay in the caches)
ALIGN_MIN_SHARE = 128  # pairs a thread is given at least: fewer are not worth a thread


def _ring(x: np.ndarray) -> np.ndarray:
    """The border pixels of (..., H, W) regions, (..., 2H + 2W)."""
    return np.concatenate([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], axis=-1)


def _product(grey: np.ndarray) -> np.ndarray:
    """Pixels of (..., H, W) greyscale regions that differ from their backdrop by more than
    ``BACKDROP_LEVEL``: the product.

    The backdrop is the border's median level, or a tilted plane where that explains
    ``BACKDROP_TILT_GAIN`` more of the border's pixels (within ``BACKDROP_LEVEL``): its slopes are the
    median steps along the border's rows and columns, so a badge or the product at the border barely moves
    them. Why: models are photographed on backdrops lit from above, 30 levels darker at the top than at the
    bottom; against a flat level most of such a backdrop counted as product, and a badge at the border
    moved the median enough to flip whole bands of it, so a dress with a SALE badge and its original had
    masks that barely matched and agreed on 10-20% of their pixels. Why the gain: a flat backdrop's or a
    close-up's border is explained as well flat, and a photo and its copy must make the same choice (the
    close-up hoodie of the tests gains 0.16-0.17 tilted, the dresses on graded backdrops 0.29-0.48).
    """
    h, w = grey.shape[-2:]
    rows, cols = np.diff(grey[..., [0, -1], :], axis=-1), np.diff(grey[..., :, [0, -1]], axis=-2)
    sx = np.median(rows.reshape(*grey.shape[:-2], -1), axis=-1)[..., None]
    sy = np.median(cols.reshape(*grey.shape[:-2], -1), axis=-1)[..., None]
    ring_y, ring_x = _ring(np.mgrid[0:h, 0:w].astype(np.float32))
    border = _ring(grey)
    fits = []
    for ring in (border, border - sy * ring_y - sx * ring_x):  # flat, then tilted
        level = np.median(ring, axis=-1)[..., None]
        fits.append((level, (np.abs(ring - level) <= BACKDROP_LEVEL).mean(axis=-1)))
    (flat_level, flat_fit), (tilted_level, tilted_fit) = fits
    product = np.abs(grey - flat_level[..., None]) > BACKDROP_LEVEL
    tilt = np.nonzero(tilted_fit >= flat_fit + BACKDROP_TILT_GAIN)  # few regions: only those are redone
    y, x = np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)
    plane = sy[tilt][:, :, None] * y + sx[tilt][:, :, None] * x + tilted_level[tilt][:, :, None]
    product[tilt] = np.abs(grey[tilt] - plane) > BACKDROP_LEVEL
    return product


def aligned_match(a: np.ndarray, b: np.ndarray, color_threshold: float = DEFAULT_COLOR_THRESHOLD,
                  agreement: float = DEFAULT_ALIGN_AGREEMENT, overlap: float = DEFAULT_ALIGN_OVERLAP) -> np.ndarray:
    """Whether thumbnails ``a`` and ``b`` (n, 32, 32, 3) uint8, pair by pair, show one photo, one of them
    possibly cropped (up to 12% a side), brightened or darkened, or carrying an overlay (a watermark over
    it, a badge or logo near an edge).

    Why: the hashes of such copies drift (the trim's box grows around a
    watermark or loses a pale product's edge; a crop into the product moves
    the 256-bit hash as far as a distinct product of the same design), but
    the pixels still line up. For each crop in ``ALIGN_CROPS``, one photo is
    cut and both are resampled to 24x24 (a crop comparison through a blur of
    ``ALIGN_BLUR``, see ``_CROP_MATRICES``); over the pixels where both show
    product (not backdrop) a gain and offset are fitted from one to the
    other (brightness), and the share of pixels that then agree (within 15%
    of the spread plus 4 levels) is the score; the comparison that scores
    best among those whose products overlap (intersection over union at
    least ``overlap``) is kept. Where leaving out one window at the frame's
    border (``_overlay_window``) lets the rest agree ``OVERLAY_AGREEMENT``,
    that share is the score and the window is left out of the colour test
    too (and, where it holds colour the other photo lacks, out of the
    brightness fit: ``_coloured_overlay_refit``). A copy passes with ``agreement`` and, on those pixels, the colour
    test (``color_distance``), so a recoloured variant still stays apart.
    Distinct products of one design differ over
    their labels (juice bottles agree on 84-86% of their pixels at best),
    and products that merely overlap little are not compared at all.
    Measured on ``bench/near_duplicates.py``'s development part (see README).
    """
    score, colour = aligned_scores(a, b, agreement, overlap)
    return (score >= agreement) & (colour <= color_threshold)


def aligned_scores(a: np.ndarray, b: np.ndarray, agreement: float = DEFAULT_ALIGN_AGREEMENT,
                   overlap: float = DEFAULT_ALIGN_OVERLAP,
                   need: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``aligned_match``'s two numbers per pair: the best comparison's share of agreeing product pixels
    (-1 where no comparison overlaps enough), and the colour distance on that comparison's pixels,
    computed (it is the costlier half) only where the share reaches ``agreement`` or ``need`` asks for
    it (inf elsewhere)."""
    a, b = np.asarray(a), np.asarray(b)
    need = np.zeros(len(a), bool) if need is None else np.asarray(need, bool)
    score, colour = np.full(len(a), -1.0), np.full(len(a), np.inf)

    def one(s: int) -> None:
        part = slice(s, s + batch)
        fa, fb = a[part].astype(np.float32), b[part].astype(np.float32)
        score[part], colour[part] = _aligned_batch(fa, fb, agreement, overlap, need[part])
        redo, ra, rb = _brightened(fa, fb)
        if len(redo):  # the darker photo brightened: where that comparison passes, and better, it counts
            s2, c2 = _aligned_batch(ra, rb, agreement, overlap, np.zeros(len(redo), bool))
            at = redo + s
            better = (s2 >= agreement) & ((score[at] < agreement) | (c2 < colour[at]))
            score[at[better]], colour[at[better]] = s2[better], c2[better]

    # every pair is scored on its own, so the batches can share the cores (numpy's array work releases the GIL)
    workers = min(cpu_count(), -(-len(a) // ALIGN_MIN_SHARE))
    batch = min(ALIGN_BATCH, -(-len(a) // max(workers, 1)))
    starts = range(0, len(a), max(batch, 1))
    if workers > 1:
        with ThreadPoolExecutor(workers, thread_name_prefix="align") as pool:
            list(pool.map(one, starts))
    else:
        for s in starts:
            one(s)
    return score, colour


def _brightened(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs of float32 thumbnails (n, 32, 32, 3) that may be a photo and a brightened copy of it, and
    those pairs with the darker photo brightened as brightening does it: (pairs, their a, their b).

    Why: brightening multiplies every level and stops it at white, so a pale product on white loses most
    of itself into the backdrop (the development part's white polos 15% brighter: their product masks
    overlapped by a third, no alignment was compared at all). The darker photo, multiplied by the gain
    fitted through black on the pixels the brighter one did not stop at white and clipped the same way,
    loses the same pixels, so the comparison sees what the copy kept. (Saturated colours, which shift
    where one channel stops first, are only partly mended: thumbnails average before they clip, and a
    yellow tape measure 15% brighter went from 27 to 20 apart in the colour test, still past it.) A
    pair qualifies when the brighter photo (on average) has ``CLIPPED_MORE`` more of its levels at white
    and the gain lies in ``BRIGHTEN_GAINS`` (fitted on the product: a small product's brightening barely
    moves the mean of a photo that is mostly white backdrop).
    """
    ma, mb = a.mean(axis=(1, 2, 3)), b.mean(axis=(1, 2, 3))
    swap = (ma > mb)[:, None, None, None]
    dark, light = np.where(swap, b, a), np.where(swap, a, b)
    kept = light < WHITE_LEVEL
    gain = (kept * light * dark).sum(axis=(1, 2, 3)) / np.maximum((kept * dark * dark).sum(axis=(1, 2, 3)), 1e-6)
    clipped_more = (~kept).mean(axis=(1, 2, 3)) - (dark >= WHITE_LEVEL).mean(axis=(1, 2, 3))
    pairs = np.flatnonzero((clipped_more >= CLIPPED_MORE) & (gain >= BRIGHTEN_GAINS[0]) & (gain <= BRIGHTEN_GAINS[1]))
    raised = np.minimum(dark[pairs] * gain[pairs, None, None, None], 255.0)
    return pairs, np.where(swap[pairs], a[pairs], raised), np.where(swap[pairs], raised, b[pairs])


def _crops(grey: np.ndarray) -> np.ndarray:
    """(n, 32, 32) greyscale thumbnails → (n, crops + 1, 24, 24): each cut by each of ``_CROP_MATRICES``."""
    rows = np.matmul(_CROP_MATRICES[None], grey[:, None])  # (n, k, 24, 32)
    return np.matmul(rows, _CROP_MATRICES.transpose(0, 2, 1)[None])


def _cut(rgb: np.ndarray, m: np.ndarray) -> np.ndarray:
    """(n, 32, 32, 3) thumbnails, each resampled by its own matrix ``m`` (n, 24, 32) → (n, 24, 24, 3)."""
    rows = np.matmul(m, rgb.reshape(len(rgb), THUMB_SIDE, -1)).reshape(len(rgb), ALIGN_SIDE, THUMB_SIDE, 3)
    return np.matmul(rows.transpose(0, 1, 3, 2), m.transpose(0, 2, 1)[:, None]).transpose(0, 1, 3, 2)


def _aligned_batch(a: np.ndarray, b: np.ndarray, agreement: float, overlap: float,
                   need: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``aligned_scores`` on one batch of float32 thumbnails (the rule is in ``aligned_match``'s docstring)."""
    ga = _crops(a.mean(axis=-1))[:, _PAIRS_A]  # grey, (n, 13, 24, 24)
    gb = _crops(b.mean(axis=-1))[:, _PAIRS_B]
    pa, pb = _product(ga), _product(gb)
    inter, union = pa & pb, pa | pb
    n_inter, n_union = inter.sum(axis=(-2, -1)), union.sum(axis=(-2, -1))
    iou = n_inter / np.maximum(n_union, 1)
    w = inter.astype(np.float32)
    close, score = _brightness_agreement(ga, gb, w)
    compared = (iou >= overlap) & (n_inter >= 8)
    pick = np.arange(len(a))
    # pairs just short of agreement: the tone curve bent as brightening bends it, where one photo is much the
    # brighter (``_brightness_agreement`` decides; the bend lifted brightened copies from 0.82-0.89 to 0.90+,
    # and pairs far below are not copies)
    first = np.where(compared, score, -1.0).argmax(axis=1)  # each pair's best alignment with the straight line
    linear = np.where(compared[pick, first], score[pick, first], -1.0)
    bent = pick[(linear >= BEND_FROM) & (linear < agreement)]
    bent = bent[_in_colour(a[bent], b[bent])]
    if len(bent):  # on that alignment only: a brightened copy needs no other
        k = first[bent]
        c, s = _brightness_agreement(ga[bent, k][:, None], gb[bent, k][:, None], w[bent, k][:, None], bend=True)
        close[bent, k], score[bent, k] = c[:, 0], s[:, 0]
    score = np.where(compared, score, -1.0)
    # the two whole photos, unblurred, where they agree: a blurred crop comparison may agree as well but shifts
    # the colours the colour test then reads (a re-encoded colour wheel failed it so)
    best = np.where(score[:, 0] >= agreement, 0, score.argmax(axis=1))
    top = score[pick, best]
    product = inter[pick, best]
    # the best alignment once more, with an overlay near the border left out (where that helps)
    outside, window = _overlay_window(w[pick, best], (product & close[pick, best]).astype(np.float32))
    refit = pick[(top >= 0) & (top < agreement) & (outside >= 0) & (outside < OVERLAY_AGREEMENT)]
    if len(refit):
        # a coloured badge skews the brightness fit of every alignment, so the best one by that fit may be the
        # wrong one (a dress with a SALE badge scored best cut 4% against the other photo whole): the refit
        # without the badge is tried on that alignment and on the two whole photos, and the better decides
        # (every alignment found no more copies on the bench and cost twice the copy check on crowded mosaics)
        tried = np.zeros((len(refit), compared.shape[1]), bool)
        tried[:, 0] = True
        tried[np.arange(len(refit)), best[refit]] = True
        k, share, box = _coloured_overlay_refit(a[refit], b[refit], compared[refit] & tried, ga[refit], gb[refit],
                                                w[refit])
        better = share > outside[refit]
        won = refit[better]
        outside[won], window[won], best[won] = share[better], box[better], k[better]
        product[won] = inter[won, k[better]]
    overlaid = (top >= 0) & (outside >= OVERLAY_AGREEMENT) & (outside > top)
    overlaid[overlaid] = _in_colour(a[overlaid], b[overlaid])
    top = np.where(overlaid, outside, top)
    colour = np.full(len(a), np.inf)
    sel = pick[(top >= agreement) | ((top >= 0) & need)]
    if len(sel):  # the colour test, on the best comparison's product pixels (an overlay's left out), in colour
        ca = _cut(a[sel], _CROP_MATRICES[_PAIRS_A[best[sel]]])
        cb = _cut(b[sel], _CROP_MATRICES[_PAIRS_B[best[sel]]])
        covered = overlaid[sel, None, None] & _window_mask(window[sel])
        colour[sel] = color_distance(ca / 255.0, cb / 255.0, where=product[sel] & ~covered)
    return top, colour


def _in_colour(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Whether each pair of (n, 32, 32, 3) thumbnails shows colour: chroma ``CHROMATIC`` or more on 1% of
    the two photos' pixels taken together.

    Why: the bent tone curve, the overlay window and the hash rule's say (``confirm``) are allowances, and
    what keeps them from joining two products of one design is the colour test. Between two greyscale
    photos it can only compare lightness, so there the straight fit over every product pixel must agree by
    itself: greyscale versions of two t-shirts of one cut with other prints agreed on 0.95 with a window
    over the print, on 0.96 bent, and passed the hash rule.
    """
    share = ((_chroma(a) >= CHROMATIC).mean(axis=(-2, -1)) + (_chroma(b) >= CHROMATIC).mean(axis=(-2, -1))) / 2
    return share >= 0.005


def _coloured_overlay_refit(a: np.ndarray, b: np.ndarray, compared: np.ndarray, ga: np.ndarray, gb: np.ndarray,
                            w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For pairs of thumbnails ``a``, ``b`` and their alignments (``compared`` (n, 13) marks those to try;
    ``ga``, ``gb``, ``w``: their greyscale regions and product pixels), the alignment, share and
    window of the best comparison once an overlay window holding colour the other photo lacks there (a red
    SALE badge) is left out of the brightness fit too: (alignment, share, window), share -1 where no
    alignment has such a window.

    Why: the gain and offset are fitted over all the product's pixels, and a badge over much of a narrow
    product (a dress model's head and shoulders) skews them enough that the rest disagrees too, and makes
    another alignment look best; the skewed fit's agreement cannot point at the badge either, so the
    window is the one where the colours differ most. Only a coloured difference counts as an overlay:
    refitted without a window, greyscale variants of two juice bottles of one design (their labels differ
    in print, not colour) agreed as copies in the bench, and nothing else tells those apart. The colours are
    compared by hue as well as strength (CIELAB a* and b*, not chroma alone): a red badge over a lime-green
    tape measure or orange scissors is as strongly coloured as what it hides, and was not found.
    """
    # a* and b* at 32 px, then cut and resampled as the greyscale is: close enough to find a badge, and one
    # CIELAB conversion a thumbnail instead of one an alignment
    i, j = np.nonzero(compared)  # the alignments that overlap, flat
    ca = np.stack([_crops(c)[i, _PAIRS_A[j]] for c in _chromaticity(a)])  # (2, pairs, 24, 24)
    cb = np.stack([_crops(c)[i, _PAIRS_B[j]] for c in _chromaticity(b)])
    product = w[i, j]
    apart = ca - cb
    box = _coloured_window(product, np.hypot(*apart))
    inside = _window_mask(box)
    cells = np.maximum(inside.sum(axis=(-2, -1)), 1)
    coloured = np.hypot(*((apart * inside).sum(axis=(-2, -1)) / cells))
    held = (box[:, 2] > 0) & (coloured >= OVERLAY_CHROMA)
    share, window = np.full(compared.shape, -1.0), np.zeros((*compared.shape, 4), int)
    window[i, j] = box
    if held.any():
        share[i[held], j[held]] = _brightness_agreement(ga[i[held], j[held]], gb[i[held], j[held]],
                                                        product[held] * ~inside[held])[1]
    best = share.argmax(axis=1)
    pick = np.arange(len(compared))
    return best, share[pick, best], window[pick, best]


def _brightness_agreement(ga: np.ndarray, gb: np.ndarray, w: np.ndarray,
                          bend: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Which pixels of (..., 24, 24) greyscale comparisons agree once a tone curve is fitted from ``ga`` to
    ``gb`` over the pixels that ``w`` (0/1) marks (within 15% of the spread plus 4 levels), and the share of
    the marked pixels that agree.

    The curve is a gain and offset (least squares: gb ~ gain * ga + offset), bent where the two photos'
    brightness differs as a brightened photo's does: brightening stops pale pixels at white, so a photo
    15% brighter is a concave curve of its original, which a straight line misses on pale products (a
    juice bottle's label agreed on 85%). A quadratic from the darker photo to the brighter is taken
    instead of the line only where it bends that way (concave), where one photo is ``BRIGHTER_LEVELS``
    brighter than the other, and by at most
    ``BEND_PER_LEVEL`` times the difference of their mean brightness: the greyscale versions of two
    distinct juice bottles of one design, 2.5-3.5 levels apart, otherwise bent their labels' prints into
    agreement (measured on ``bench/near_duplicates.py``'s development part). The bent curve costs as much
    again as the rest of the aligned check, so it is fitted only with ``bend``, for the pairs that need it
    and on their best alignment only (``_aligned_batch``).
    """
    n = np.maximum(np.count_nonzero(w, axis=(-2, -1)), 1)[..., None, None]

    def total(x: np.ndarray) -> np.ndarray:  # over the marked pixels
        return (w * x).sum(axis=(-2, -1), keepdims=True)

    def agree(dst: np.ndarray, fitted: np.ndarray) -> np.ndarray:
        spread = np.sqrt(total((dst - total(dst) / n) ** 2) / n)
        return np.abs(fitted - dst) < 0.15 * np.maximum(spread, 1.0) + 4.0

    dx = ga - total(ga) / n
    gain = total(dx * (gb - total(gb) / n)) / np.maximum(total(dx * dx), 1e-6)
    close = agree(gb, gain * dx + total(gb) / n)
    if not bend:
        return close, total(close)[..., 0, 0] / n[..., 0, 0]
    # the bent curve goes from the darker photo to the brighter: the other way, the levels that brightening
    # ran together at white would have to come apart again
    swap = (total(ga) > total(gb))
    src, dst = np.where(swap, gb, ga), np.where(swap, ga, gb)
    x = (src - 128.0) / 128.0  # the quadratic, on the pixels' levels scaled to [-1, 1]
    basis = [np.ones_like(x), x, x * x]
    gram = np.stack([np.stack([total(p * q)[..., 0, 0] for q in basis], -1) for p in basis], -2)
    rhs = np.stack([total(p * dst)[..., 0, 0] for p in basis], -1)
    coef = np.linalg.solve(gram + 1e-3 * np.eye(3), rhs[..., None])[..., 0]
    brighter = (total(dst) - total(src))[..., 0, 0] / n[..., 0, 0]
    bends = (coef[..., 2] < 0) & (brighter >= BRIGHTER_LEVELS) & (-coef[..., 2] <= BEND_PER_LEVEL * brighter)
    bent = agree(dst, sum(coef[..., i, None, None] * basis[i] for i in range(3)))
    close = np.where(bends[..., None, None], bent, close)
    return close, total(close)[..., 0, 0] / n[..., 0, 0]


def _window_mask(window: np.ndarray) -> np.ndarray:
    """(n, 4) windows as (top, left, bottom, right) → (n, ALIGN_SIDE, ALIGN_SIDE) masks of the pixels inside."""
    y0, x0, y1, x1 = np.moveaxis(window, -1, 0)[..., None, None]
    rows, cols = np.arange(ALIGN_SIDE)[:, None], np.arange(ALIGN_SIDE)[None, :]
    return (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)


def _integral(x: np.ndarray) -> np.ndarray:
    """The integral image of (..., S, S), zero-padded: (..., S+1, S+1) float32."""
    c = np.zeros((*x.shape[:-2], x.shape[-2] + 1, x.shape[-1] + 1), np.float32)
    c[..., 1:, 1:] = x.cumsum(-2, dtype=np.float32).cumsum(-1)
    return c


def _border_positions(h: int, w: int, side: int = ALIGN_SIDE) -> tuple[np.ndarray, np.ndarray]:
    """(tops, lefts) of every h x w window that touches the border of a side x side frame, row by row."""
    top, left = np.mgrid[0:side - h + 1, 0:side - w + 1]
    border = (top == 0) | (left == 0) | (top == side - h) | (left == side - w)
    return top[border], left[border]


_BORDER = {(h, w): _border_positions(h, w) for h, w in OVERLAY_WINDOWS}


def _border_window(product: np.ndarray, inside: np.ndarray,
                   score: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """For each comparison, the ``OVERLAY_WINDOWS`` window touching the frame's border that hides at most
    ``OVERLAY_HIDES`` of the ``product`` and scores highest, ``score(product pixels left outside, sum of ``inside``
    within)``: (that score, -1 where no window qualifies; the window as (top, left, bottom, right), all
    zero where none does). Ties go to the first shape, then the first window row by row."""
    n_product = product.sum(axis=(-2, -1))[..., None]
    integrals = _integral(product), _integral(inside)
    best = np.full(product.shape[:-2], -1.0)
    box = np.zeros((*product.shape[:-2], 4), int)
    for (h, w), (top, left) in _BORDER.items():
        within = [c[..., top + h, left + w] - c[..., top, left + w] - c[..., top + h, left] + c[..., top, left]
                  for c in integrals]
        rest = n_product - within[0]
        value = np.where(rest >= (1.0 - OVERLAY_HIDES) * n_product, score(rest, within[1]), -1.0)
        k = value.argmax(axis=-1)
        top_value = np.take_along_axis(value, k[..., None], axis=-1)[..., 0]
        better = top_value > best
        best = np.where(better, top_value, best)
        box = np.where(better[..., None], np.stack([top[k], left[k], top[k] + h, left[k] + w], axis=-1), box)
    return best, box


def _overlay_window(product: np.ndarray, agree: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each comparison, the share of agreeing product pixels outside the best ``OVERLAY_WINDOWS`` window
    that touches the frame's border (-1 where every such window would hide over ``OVERLAY_HIDES`` of the product),
    and that window as (top, left, bottom, right).

    Why only at the border: shops stamp badges and logos in a corner or along an edge, often half over the
    backdrop, while a product's own print sits inside it. Leaving out a window anywhere would let two shirts
    of one cut with another print in the middle pass as copies; at the border the same freedom finds the copy
    with a SALE badge over a pale polo, whose badge pixels would otherwise fail the agreement or, on an
    article with little colour of its own, be all the colour test sees.
    """
    n_agree = agree.sum(axis=(-2, -1))[..., None]
    return _border_window(product, agree, lambda rest, agreeing: (n_agree - agreeing) / np.maximum(rest, 1))


def _coloured_window(product: np.ndarray, difference: np.ndarray) -> np.ndarray:
    """For each comparison, the ``OVERLAY_WINDOWS`` window at the frame's border that holds the most colour
    ``difference`` (chromaticity, pixel by pixel) and hides at most ``OVERLAY_HIDES`` of the ``product``, as (top, left,
    bottom, right); all zero where no window qualifies."""
    return _border_window(product, difference, lambda rest, held: held)[1]


def _within(bits: int, radius: int) -> int:
    """How many keys lie within ``radius`` bits of a ``bits``-bit key."""
    return sum(math.comb(bits, d) for d in range(radius + 1))


def block_widths(blocks: int) -> list[int]:
    """Bit widths of the ``blocks`` blocks a 64-bit hash is cut into (as even as possible)."""
    return [HASH_BITS // blocks + (1 if i < HASH_BITS % blocks else 0) for i in range(blocks)]


def block_radii(n: int, radius: int, blocks: int) -> list[int]:
    """How far each of ``blocks`` blocks is probed so that every hash within ``radius`` bits is found, for
    ``n`` stored hashes: radii summing to ``radius - blocks + 1``, spent where they cost least.

    Why not ``radius // blocks`` on every block: two hashes that differ by more than t_i bits in every
    block i differ by at least sum(t_i + 1) bits, so radii summing to ``radius - blocks + 1`` already miss
    no hash within ``radius`` (the general pigeonhole principle, Qin et al., VLDB 2018). With 3 blocks and
    radius 10 that is (3, 3, 2) instead of (3, 3, 3): a quarter fewer probes and a third fewer candidates,
    the same hashes found. Each bit of radius goes, one at a time, to the block where the extra ball
    shell costs least (probes plus the candidates they hold), which is optimal as shells grow with radius.
    """
    widths = block_widths(blocks)
    radii = [0] * blocks

    def shell(i: int) -> float:  # cost of probing block i one bit further
        return math.comb(widths[i], radii[i] + 1) * (1 + n / 2.0 ** widths[i])

    for _ in range(max(radius - blocks + 1, 0)):
        radii[min(range(blocks), key=shell)] += 1
    return radii


def block_flips(width: int, radius: int) -> list[int]:
    """Every XOR mask of at most ``radius`` bits in a ``width``-bit block: the keys a probe visits."""
    return [sum(1 << bit for bit in combo)
            for d in range(radius + 1) for combo in itertools.combinations(range(width), d)]


def plan_blocks(n: int, radius: int, max_width: int = 32) -> int:
    """Block count that minimises expected query cost for ``n`` stored hashes.

    A query with ``m`` blocks of ``b`` bits probes ``V(b, t)`` buckets per block
    (V: Hamming-ball volume, t: ``block_radii``) and checks the ``n * V / 2**b``
    hashes each holds (for spread-out hashes). Few wide blocks cost more probes but far
    fewer candidates, so the best ``m`` falls as the collection grows.
    """
    best, best_cost = 1, float("inf")
    for m in range(1, radius + 2):
        if -(-HASH_BITS // m) > max_width:  # a 64-bit ball of radius r is too big to enumerate
            continue
        cost = sum(_within(b, t) * (1 + n / 2.0**b) for b, t in zip(block_widths(m), block_radii(n, radius, m)))
        if cost < best_cost:
            best, best_cost = m, cost
    return best


class MultiIndexHash:
    """Exact r-neighbour search over 64-bit hashes without comparing all pairs.

    ``m`` tables, one per block of the hash. A query enumerates, for each block,
    every key within ``r // m`` bits of its own block and collects those
    buckets' entries as candidates; candidates are then checked in full.
    ``m`` follows ``plan_blocks`` and the tables are rebuilt whenever the
    collection doubles, so inserts stay amortised O(m) and a query's cost stays
    near the cost model's minimum (README, "How dedupe scales").
    """

    def __init__(self, radius: int, blocks: int | None = None) -> None:
        self.radius = radius
        self._fixed = blocks
        self._hashes: dict[int, int] = {}
        self._replan_at = 1024
        self._build(blocks or plan_blocks(self._replan_at, radius))

    def _build(self, blocks: int) -> None:
        self.blocks = blocks
        widths = block_widths(blocks)
        self._shifts = [sum(widths[:i]) for i in range(blocks)]
        self._masks = [(1 << w) - 1 for w in widths]
        self._flips = [block_flips(w, t) for w, t in zip(widths, block_radii(self._replan_at, self.radius, blocks))]
        self._tables: list[dict[int, list[int]]] = [defaultdict(list) for _ in range(blocks)]
        for key, h in self._hashes.items():
            self._insert(key, h)

    def __len__(self) -> int:
        return len(self._hashes)

    def _split(self, h: int) -> list[int]:
        return [(h >> shift) & mask for shift, mask in zip(self._shifts, self._masks)]

    def _insert(self, key: int, h: int) -> None:
        for table, part in zip(self._tables, self._split(h)):
            table[part].append(key)

    def add(self, key: int, h: int) -> None:
        self._hashes[key] = h
        self._insert(key, h)
        if len(self._hashes) >= self._replan_at:
            self._replan_at *= 2
            if self._fixed is None and (m := plan_blocks(self._replan_at, self.radius)) != self.blocks:
                self._build(m)

    def query(self, h: int) -> list[tuple[int, int]]:
        """All stored (key, distance) within ``radius`` of ``h``, nearest first."""
        seen: set[int] = set()
        hits: list[tuple[int, int]] = []
        for table, part, flips in zip(self._tables, self._split(h), self._flips):
            for flip in flips:
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
    close_phash: int = CLOSE_PHASH
    close_fine_threshold: int = CLOSE_FINE_THRESHOLD
    align_agreement: float = DEFAULT_ALIGN_AGREEMENT
    align_overlap: float = DEFAULT_ALIGN_OVERLAP
    embedding_similarity: float = DEFAULT_EMBEDDING_SIMILARITY  # ``copies``: above 1, no photo is a candidate

    @property
    def aligned(self) -> bool:
        """Whether the aligned check is on (an ``align_agreement`` above 1 turns it off)."""
        return self.align_agreement <= 1.0

    def fine_limit(self, phash_distance):
        """The verification hash's threshold for a candidate ``phash_distance`` bits away (scalar or array).

        Why two tiers: a crop that cuts 4-8% into the product moves the 256-bit
        hash 38-80 bits, as far as two distinct products of one design, but
        its 64-bit hash stays within a few bits. Measured on
        ``bench/near_duplicates.py``'s development part: candidates within
        ``close_phash`` bits take 45 more copy pairs at ``close_fine_threshold``
        and no false pair (the colour test still applies). The distance is the
        search's (``candidate_distance``: the nearer of the trimmed and the whole
        photo's pHash): a pale product 15% brighter loses its edges to the
        backdrop, so the trimmed hashes drift (10-12 and 40-42 bits) while the
        whole photo stays within 4, and that copy anchored the next one (an 8%
        crop of the same lipstick was paired with the brighter copy, not the
        original); development part 647 → 649 of 650, no false pair.
        """
        return np.where(np.asarray(phash_distance) <= self.close_phash, self.close_fine_threshold,
                        self.fine_threshold)


@dataclass(frozen=True)
class Candidate:
    """What dedupe needs to know about one decodable photo."""

    row: int
    sha256: str
    area: int
    hashes: Hashes
    fidelity: int = 100  # the file's encoding quality (``decode.encoding_quality``): ``find_duplicates`` keeps the higher


@dataclass(frozen=True)
class Match:
    """``row`` duplicates ``kept``; ``kind`` is ``exact`` or ``near``."""

    row: int
    kept: int
    kind: str
    phash_distance: int = 0


def candidate_distance(a: Hashes, b: Hashes) -> int:
    """How far apart two photos (``a`` in some view, ``b`` upright) are for the search: the nearer of the
    trimmed product's pHashes and, where both have them, the whole photos'."""
    d = hamming(a.phash, b.phash)
    return min(d, hamming(a.whole[0], b.whole[0])) if a.whole and b.whole else d


def hash_rule(a: Hashes, b: Hashes, cfg: DedupeConfig) -> bool:
    """The cheap check: the trimmed pHashes within the radius, the fine hash within ``cfg.fine_limit`` of the
    search's distance (``candidate_distance``) and the colour grids within ``cfg.color_threshold``."""
    coarse = hamming(a.phash, b.phash)
    return (coarse <= cfg.phash_threshold and hamming(a.fine, b.fine) <= cfg.fine_limit(candidate_distance(a, b))
            and bool(color_distance(a.color, b.color) <= cfg.color_threshold))


def aligned_on(a: Hashes, b: Hashes, cfg: DedupeConfig) -> bool:
    """Whether the aligned check has a say on this pair (``confirm``): both photos have thumbnails (records
    indexed before them have none) and it is switched on (``align_agreement`` above 1 turns it off)."""
    return cfg.aligned and a.thumb is not None and b.thumb is not None


def confirm(hash_ok: np.ndarray, a: np.ndarray, b: np.ndarray, cfg: DedupeConfig) -> np.ndarray:
    """The second-stage verdict of candidate pairs whose thumbnails ``a`` and ``b`` (n, 32, 32, 3) both
    exist, from the hash rule's verdict and ``aligned_scores``: a copy when its pixels agree once aligned
    (``cfg.align_agreement``), or when the hash rule says so, the aligned pixels do not contradict it and
    the photos have colour (``_in_colour``); either way the colour test on the aligned pixels must pass,
    unless no alignment was found (the hash rule alone then decides).

    Why the aligned colour test vetoes the hash rule: the hash rule summarises a photo (a 256-bit pHash,
    a 4x4 colour grid of the trimmed product) and let distinct articles of one cut through, a grey hoodie
    and another hoodie's greyscale variant (fine hash 6 bits apart, grid colour 0.5): their aligned
    pixels line up (agreement 0.92-0.99) but differ in colour (11.5-73). Why the hash rule still counts:
    pixel agreement is strict at sharp edges, and the tests' drawn product photo cropped 7.5% a side
    agrees on only 84% of its pixels. On ``bench/near_duplicates.py`` this took false pairs from 11 to 1
    (development part) and from 6 to 0 (test part), and more copies were found. Why not between two
    greyscale photos: there the colour test compares lightness alone, and greyscale versions of two
    t-shirts of one cut with other prints pass the hash rule with 0.82-0.85 of their pixels agreeing.
    """
    score, colour = aligned_scores(a, b, cfg.align_agreement, cfg.align_overlap, hash_ok)
    vouched = hash_ok & (score >= 0) & (score < cfg.align_agreement)
    vouched[vouched] = _in_colour(a[vouched], b[vouched])
    colour_ok = colour <= cfg.color_threshold
    return np.where(score < 0, hash_ok, colour_ok & ((score >= cfg.align_agreement) | vouched))


def near_all(a: Hashes, others: list[Hashes], cfg: DedupeConfig) -> np.ndarray:
    """Second-stage check of candidates (``a`` in some view, each of ``others`` upright): the hash rule,
    and where both photos have thumbnails and the aligned check is on, ``confirm`` with its scores."""
    ok = np.array([hash_rule(a, b, cfg) for b in others], bool)
    pixels = [i for i, b in enumerate(others) if aligned_on(a, b, cfg)]
    if pixels:
        ok[pixels] = confirm(ok[pixels], np.broadcast_to(a.thumb, (len(pixels), *a.thumb.shape)),
                             np.stack([others[i].thumb for i in pixels]), cfg)
    return ok


def is_near(a: Hashes, b: Hashes, cfg: DedupeConfig) -> bool:
    """Whether ``b`` (upright) passes the second-stage check as a copy of ``a`` (in some view)."""
    return bool(near_all(a, [b], cfg)[0])


class MatchIndex(Protocol):
    """What ``find_duplicates`` walks: the kept photos so far, asked one candidate at a time.

    ``DedupeIndex`` searches as it goes; ``nearpairs.NearPairs`` looks the
    answer up in pairs searched beforehand in bulk (vectorised, or on a Ray
    cluster). Both answer the same question in the same order, so every runner
    makes the same decisions.
    """

    def add(self, key: int, sha256: str, hashes: Hashes) -> None: ...

    def match(self, cand: Candidate) -> tuple[int, str, int] | None: ...

    def discard(self, key: int, sha256: str) -> None:
        """Stop matching a kept photo (found to be a copy after classification, ``copies``)."""

    def prepare(self, cands: list[Candidate]) -> None:
        """Called with every candidate before the walk (``nearpairs.BatchIndex`` searches them in bulk)."""


class DedupeIndex:
    """The kept photos so far (this batch, earlier chunks, earlier nights) and their hashes.

    Keys are integers chosen by the caller: this run's row numbers, or
    negative keys for photos kept on earlier nights (see ``store``).
    """

    def __init__(self, cfg: DedupeConfig = DedupeConfig()) -> None:
        self.cfg = cfg
        self.by_sha: dict[str, int] = {}
        self.kept: dict[int, Hashes] = {}
        self.mih = MultiIndexHash(cfg.phash_threshold)
        self.mih_whole = MultiIndexHash(cfg.phash_threshold)
        self.mih_inner = MultiIndexHash(cfg.phash_threshold)

    def __len__(self) -> int:
        return len(self.kept)

    def add(self, key: int, sha256: str, hashes: Hashes) -> None:
        self.by_sha.setdefault(sha256, key)
        self.kept[key] = hashes
        self.mih.add(key, hashes.phash)
        if hashes.whole:
            self.mih_whole.add(key, hashes.whole[0])
        if hashes.inner is not None:
            self.mih_inner.add(key, hashes.inner)

    def discard(self, key: int, sha256: str) -> None:
        """Stop matching a kept photo; its hashes stay in the multi-index tables and are skipped."""
        self.kept.pop(key, None)
        if self.by_sha.get(sha256) == key:
            del self.by_sha[sha256]

    def prepare(self, cands: list[Candidate]) -> None:
        """Nothing to do: this index searches as the walk asks."""

    def match(self, cand: Candidate) -> tuple[int, str, int] | None:
        """(kept key, ``exact`` or ``near``, pHash distance) of the photo this one repeats, or None."""
        if cand.sha256 in self.by_sha:
            return self.by_sha[cand.sha256], "exact", 0
        hashes = cand.hashes
        for k in range(len(hashes.rotated) + 1):  # upright first, then the pixel rotations, then the mirror
            view = hashes.view(k)
            found = {key for key, _ in self.mih.query(view.phash)}
            if k in WHOLE_VIEWS and view.whole:  # the whole photo's hash, upright and mirrored
                found.update(key for key, _ in self.mih_whole.query(view.whole[0]))
            if k in INNER_VIEWS and view.whole:  # ...and upright among the kept photos' inner ones
                found.update(key for key, _ in self.mih_inner.query(view.whole[0]))
            ranked = sorted((candidate_distance(view, self.kept[key]), key) for key in found if key in self.kept)
            for (dist, key), ok in zip(ranked, near_all(view, [self.kept[key] for _, key in ranked], self.cfg)):
                if ok:  # nearest first, then the lowest key
                    return key, "near", dist
        return None


def keep_order(area: int, fidelity: int, key: int) -> tuple[int, int, int]:
    """Where a photo comes in the walk that decides which copy is kept (``find_duplicates``, and the copy
    check's ``copies.find_copies``): most pixels first, then the better encoding, then the first key."""
    return -area, -fidelity, key


def find_duplicates(
    items: Iterable[Candidate], cfg: DedupeConfig = DedupeConfig(), index: MatchIndex | None = None
) -> dict[int, Match]:
    """Map each duplicate row to the kept photo it repeats; rows absent are kept (and added to ``index``).

    Rule (documented in the README): within ``items`` the kept photo is the one
    with the most pixels, ties going to the better encoding (``fidelity``: a
    JPEG's quality), then to the row seen first. Why the encoding: the kept
    photo is the one classified and the one every later copy is compared
    against; a JPEG of quality 35 kept before its original (it came first) left
    a small photo's half-size and cropped copies 0.86 alike to its artefacts,
    under the aligned check's 0.90. (Not the file's bytes: a phone's re-encode
    of the original with its EXIF block was the larger file.) Photos are visited
    in that priority order and each is matched only against photos already
    kept, so ``duplicate_of`` always points at a kept photo (no chains) and the
    result does not depend on the order of equal-priority rows. Photos already
    in ``index`` (earlier chunks or nights) were kept first and stay kept.
    ``index`` may also be a ``nearpairs.NearPairs``: the same walk over pairs
    found beforehand, in parallel.
    """
    index = index if index is not None else DedupeIndex(cfg)
    order = sorted(items, key=lambda c: keep_order(c.area, c.fidelity, c.row))
    index.prepare(order)
    matches: dict[int, Match] = {}
    for cand in order:
        found = index.match(cand)
        if found is not None:
            key, kind, dist = found
            matches[cand.row] = Match(cand.row, key, kind, dist)
        else:
            index.add(cand.row, cand.sha256, cand.hashes)
    return matches
