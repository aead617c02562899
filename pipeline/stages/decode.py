"""Decode any photo a shop uploads into RGB pixels, or say precisely why not.

Why this is its own stage: a nightly job meets zero-byte uploads, truncated
transfers, text files named ``.jpg``, iPhone HEICs, CMYK print files, palette
PNGs with transparency, 16-bit scans and decompression bombs. Each must become
one row with a reason code, never a crash and never a silent drop. Pixels are
always delivered EXIF-upright and RGB, so hashing and the model see the photo
the way a person does.
"""

from __future__ import annotations

import io
import math
import os
import stat
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pipeline.models.preprocess import Preprocess

ImageFile.LOAD_TRUNCATED_IMAGES = False

DEFAULT_MAX_PIXELS = 64_000_000  # a 8000x8000 photo; bombs claim far more


def pixel_guard(max_pixels: int) -> None:
    """Keep Pillow's process-wide decompression-bomb guard on, at our limit.

    ``open_image`` checks the size Pillow reports before decoding, but some
    formats decode inside ``Image.open`` (an ICO entry that wraps a PNG, for
    one); Pillow checks each such frame against ``MAX_IMAGE_PIXELS`` first and
    raises ``DecompressionBombError`` above twice that, so half our limit makes
    its guard refuse exactly what ours would.
    """
    Image.MAX_IMAGE_PIXELS = max(1, -(-max_pixels // 2))


pixel_guard(DEFAULT_MAX_PIXELS)
DEFAULT_MAX_BYTES = 100 * 1024 * 1024

#: Reason codes in the ``error`` column; the README documents each.
ERROR_CODES = (
    "missing",  # no file at that path (or a dangling link)
    "not_a_file",  # a folder or device where a photo should be
    "unreadable",  # permission denied or an I/O error
    "empty",  # zero bytes
    "too_large_file",  # more bytes than --max-bytes
    "not_an_image",  # Pillow cannot identify it (text, HTML, random bytes)
    "unsupported_format",  # a real image format Pillow cannot decode (HEIC, AVIF, SVG, PDF)
    "too_large",  # more pixels than --max-pixels (decompression bomb guard)
    "truncated",  # the file ends before the image data does
    "unsupported_mode",  # a pixel layout we cannot turn into RGB
    "decode_failed",  # any other decoder error, with its message
    "no_path",  # the manifest row's path cell is empty
    "malformed_row",  # the manifest row has more cells than the header
    "outside_manifest",  # the manifest path leaves the manifest's folder (without --allow-outside)
)

_SNIFF = (
    (b"ftypheic", "HEIC"),
    (b"ftypheix", "HEIC"),
    (b"ftyphevc", "HEIC"),
    (b"ftypmif1", "HEIF"),
    (b"ftypmsf1", "HEIF"),
    (b"ftypavif", "AVIF"),
)


class DecodeError(Exception):
    """A photo that cannot be used; ``code`` is one of ``ERROR_CODES``."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


def read_bytes(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Read a whole file, turning every filesystem failure into a ``DecodeError``.

    Opened non-blocking and refused unless it is a regular file, so a FIFO or a
    device named ``x.jpg`` can never hang the night (with the store locked).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) \
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "a socket or special file"
            raise DecodeError("not_a_file", f"is {kind}")
        with os.fdopen(fd, "rb") as fh:
            size = st.st_size
            if size > max_bytes:
                raise DecodeError("too_large_file", f"{size} bytes > limit {max_bytes}")
            data = fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise DecodeError("missing", "no such file") from None
    except IsADirectoryError:
        raise DecodeError("not_a_file", "is a directory") from None
    except PermissionError:
        raise DecodeError("unreadable", "permission denied") from None
    except OSError as exc:
        raise DecodeError("unreadable", exc.strerror or str(exc)) from None
    if not data:
        raise DecodeError("empty", "zero bytes")
    if len(data) > max_bytes:  # grew while we read it
        raise DecodeError("too_large_file", f"more than {max_bytes} bytes")
    return data


def _sniff_unsupported(data: bytes) -> str | None:
    head = data[:64]
    for magic, name in _SNIFF:
        if magic in head[:16]:
            return name
    stripped = head.lstrip()
    if stripped.startswith(b"%PDF"):
        return "PDF"
    if stripped.startswith(b"<svg") or (stripped.startswith(b"<?xml") and b"<svg" in data[:1024]):
        return "SVG"
    if head.startswith(b"\xff\x0a") or head.startswith(b"\x00\x00\x00\x0cJXL "):
        return "JPEG XL"
    return None


def _decoder_error(exc: BaseException) -> DecodeError:
    """Map a Pillow decoder exception to ``truncated`` or ``decode_failed``."""
    msg = str(exc) or type(exc).__name__
    if "truncated" in msg.lower() or isinstance(exc, EOFError) or "broken data stream" in msg:
        return DecodeError("truncated", msg)
    return DecodeError("decode_failed", msg)


# libjpeg's (IJG) base luminance quantisation table, in natural order, and its scaling to each quality 1-100
_IJG_LUMA = np.array([16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
                      14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
                      49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], np.float64)
_IJG_TABLES = np.stack([np.clip(np.floor((_IJG_LUMA * (5000 / q if q < 50 else 200 - 2 * q) + 50) / 100), 1, 255)
                        for q in range(1, 101)])


def encoding_quality(img: Image.Image) -> int:
    """How faithfully an opened file keeps its pixels, 1-100: a JPEG's quality, as the nearest of libjpeg's
    100 scalings of its luminance table (read from the header: nothing is decoded); 100 for other formats.

    Why: of two copies of one photo with as many pixels, dedupe keeps the better encoded (the one
    classified, and the one later copies are compared against); a quality-35 re-encode that came first
    made a poor anchor. Other formats count as faithful: PNG is lossless, and a WebP or GIF copy of one
    size beside a JPEG is rare enough that the row order decides between them.
    """
    tables = getattr(img, "quantization", None) if img.format in ("JPEG", "MPO") else None  # MPO: phones' JPEGs
    luma = np.asarray(tables[min(tables)], np.float64) if tables else np.zeros(0)
    if luma.size != 64:
        return 100
    return int(np.abs(_IJG_TABLES - luma).sum(axis=1).argmin()) + 1


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Identify the image and check its pixel count; no pixels are decoded yet."""
    pixel_guard(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise DecodeError("too_large", f"{exc} (limit {max_pixels} pixels)") from None
    except UnidentifiedImageError:
        fmt = _sniff_unsupported(data)
        if fmt:
            raise DecodeError("unsupported_format", f"{fmt} is not supported") from None
        raise DecodeError("not_an_image", "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise _decoder_error(exc) from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise DecodeError("decode_failed", f"invalid size {w}x{h}")
    if w * h > max_pixels:
        raise DecodeError("too_large", f"{w}x{h} = {w * h} pixels > limit {max_pixels}")
    return img


def upright_size(img: Image.Image) -> tuple[int, int]:
    """Width and height as displayed, i.e. after the EXIF orientation is applied."""
    w, h = img.size
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a corrupt EXIF block must not fail the photo
        orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _high_bit_to_l(img: Image.Image) -> Image.Image:
    """16-bit/32-bit/float greyscale → 8-bit L, scaling by the format's range."""
    arr = np.asarray(img, dtype=np.float64)
    top = float(arr.max()) if arr.size else 0.0
    if img.mode == "F":
        lo = float(arr.min()) if arr.size else 0.0
        scale = 255.0 / (top - lo) if top > lo else 1.0
        arr = (arr - lo) * scale
    elif top > 255:
        arr = arr * (255.0 / (65535.0 if top <= 65535 else top))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Normalise every Pillow mode to RGB; transparent pixels become white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _high_bit_to_l(img).convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    try:
        if has_alpha:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise DecodeError("unsupported_mode", f"cannot convert mode {mode} to RGB ({exc})") from None


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None) -> Image.Image:
    """Decode ``data`` to an upright RGB image, first frame only (see ``decode_opened``)."""
    return decode_opened(open_image(data, max_pixels), min_side)


def decode_opened(img: Image.Image, min_side: int | None = None) -> Image.Image:
    """Decode an image from ``open_image`` to upright RGB, first frame only.

    ``min_side``: the caller needs at least this many pixels on each side, so a
    JPEG may be decoded at 1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling
    (draft mode); a 4000 px photo bound for a 224 px model never exists at full
    size in memory.
    """
    try:
        if min_side and img.format == "JPEG":
            img.draft(None, (min_side, min_side))
        img.seek(0)
        img.load()
        ImageOps.exif_transpose(img, in_place=True)  # not a copy of every photo that is upright already
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise _decoder_error(exc) from None
    return to_rgb(img)


def center_crop_resize(img: Image.Image, size: int, resize_short: int) -> np.ndarray:
    """Resize the short side to ``resize_short`` and take the central ``size`` square.

    Done as one Pillow resize from a source box, so the discarded border is
    never resampled. Returns HxWx3 uint8.
    """
    w, h = img.size
    side = min(w, h) * size / resize_short  # crop side in source pixels
    left, top = (w - side) / 2, (h - side) / 2
    out = img.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side), reducing_gap=3.0)
    return np.asarray(out, dtype=np.uint8)


def load_for_model(
    path: str | Path, size: int = 224, resize_short: int = 256, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Path → model-ready HxWx3 uint8 pixels (raises ``DecodeError``)."""
    img = decode(read_bytes(path), max_pixels=max_pixels, min_side=resize_short)
    return center_crop_resize(img, size, resize_short)


def thumbnail_size(size: tuple[int, int], side: int) -> tuple[int, int]:
    """The size Pillow's ``thumbnail((side, side))`` gives an image of ``size`` (its own rounding, so the
    pixels, and the hashes made from them, stay the same), without the copy ``thumbnail`` works on."""
    w, h = size
    if w <= side and h <= side:
        return w, h
    aspect = w / h

    def nearest(number: float, key) -> int:
        return max(min(math.floor(number), math.ceil(number), key=key), 1)

    if aspect <= 1:
        return nearest(side * aspect, lambda n: abs(aspect - n / side)), side
    return side, nearest(side / aspect, lambda n: 0 if n == 0 else abs(aspect - side / n))


def thumbnail(img: Image.Image, side: int, resample: Image.Resampling) -> Image.Image:
    """A new image as ``img.copy()`` then ``thumbnail((side, side), resample)`` gives it, without the copy."""
    return img.resize(thumbnail_size(img.size, side), resample, reducing_gap=2.0)


TRIM_SIDE = 256  # trim_box's mask: the photo as decoded up to a long side of 511 px, else a 256 px thumbnail


def trim_box(img: Image.Image, tolerance: int = 24, min_fraction: float = 0.05) -> tuple[int, int, int, int] | None:
    """The bounding box of pixels that differ from the border colour, or None (no plain border, blank).

    Product photos are an object on a plain backdrop; hashing the object rather
    than the frame makes the fingerprints indifferent to how much backdrop a
    crop or a re-framing left, and keeps a small product's colour from being
    diluted by white. A box, not a cropped image: the scan cuts it from each
    version of the photo it already has (colour and greyscale).
    """
    # The scan's JPEG decode is already small and smooth (reduced in the DCT): its mask is made as it is. A larger
    # decode (a PNG or WebP read at full size) is smoothed to 256 px first, bilinear: a plain box reduction there
    # keeps the file's compression specks above the tolerance and grew a PNG copy's box by a tenth (a miss).
    small = img if max(img.size) < 2 * TRIM_SIDE else thumbnail(img, TRIM_SIDE, Image.BILINEAR)
    # Twice the pixel values, in int16: the border's median is a whole or half value, so the comparison
    # with it stays exact in integers (float64 arithmetic here cost more than every hash together).
    arr = np.asarray(small, dtype=np.int16) * 2
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    bg = np.median(border, axis=0).astype(np.int16)
    if np.abs(border - bg).max(axis=1).mean() > 2 * tolerance:  # no uniform backdrop
        return None
    diff = np.abs(arr - bg)
    # per channel, not .max(axis=2): a reduction over 3 values is 10x slower than two elementwise ORs
    mask = (diff[..., 0] > 2 * tolerance) | (diff[..., 1] > 2 * tolerance) | (diff[..., 2] > 2 * tolerance)
    count = int(np.count_nonzero(mask))
    if count == 0 or count < min_fraction * mask.size * 0.1:  # blank, or only specks
        return None
    ys, xs = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    sx, sy = img.width / small.width, img.height / small.height
    box = (int(xs[0] * sx), int(ys[0] * sy), int(np.ceil((xs[-1] + 1) * sx)), int(np.ceil((ys[-1] + 1) * sy)))
    if (box[2] - box[0]) * (box[3] - box[1]) < min_fraction * img.width * img.height:
        return None
    return box


def trim_background(img: Image.Image, tolerance: int = 24, min_fraction: float = 0.05) -> Image.Image:
    """``img`` cropped to its ``trim_box``; unchanged when it has none."""
    box = trim_box(img, tolerance, min_fraction)
    return img if box is None else img.crop(box)


def to_fashion_mnist(img: Image.Image, background_tolerance: int = 24) -> np.ndarray:
    """A product photo → a Fashion-MNIST-style 28x28 uint8 array (light product on black).

    Fashion-MNIST was made by trimming the product off its white background,
    fitting the long side into 28 px, centring it on a square canvas,
    converting to grey and inverting. We do the same.
    """
    obj = trim_background(img.convert("RGB"), tolerance=background_tolerance, min_fraction=0.0)
    gray = ImageOps.invert(obj.convert("L"))
    side = max(gray.size)
    canvas = Image.new("L", (side, side), 0)
    canvas.paste(gray, ((side - gray.width) // 2, (side - gray.height) // 2))
    return np.asarray(canvas.resize((28, 28), Image.LANCZOS), dtype=np.uint8)


def load_pixels(preprocess: Preprocess, path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Path → HxWxC uint8 model input as ``preprocess`` names it (raises ``DecodeError``)."""
    if preprocess.name == "center_crop":
        return load_for_model(path, preprocess.size, preprocess.resize_short, max_pixels)
    if preprocess.name == "fashion_mnist":
        img = decode(read_bytes(path), max_pixels=max_pixels, min_side=4 * preprocess.size)
        return to_fashion_mnist(img)[..., None]
    raise ValueError(f"unknown preprocessing {preprocess.name!r}")
