"""Every mode becomes upright RGB; every broken file becomes a precise reason."""

import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import EXIF_TRANSFORMS
from pipeline.stages.decode import (DecodeError, decode, load_for_model, read_bytes, thumbnail_size, trim_background,
                                   upright_size, open_image)


def _bytes(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _code(fn, *args, **kw):
    with pytest.raises(DecodeError) as info:
        fn(*args, **kw)
    return info.value.code


@pytest.mark.parametrize(
    "img, fmt",
    [
        (Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG"),  # red in CMYK
        (Image.new("L", (40, 30), 128), "PNG"),
        (Image.new("1", (40, 30), 1), "PNG"),
        (Image.new("LA", (40, 30), (10, 0)), "PNG"),  # fully transparent -> white
        (Image.new("RGBA", (40, 30), (255, 0, 0, 0)), "PNG"),  # transparent red -> white
        (Image.new("I;16", (40, 30), 65535), "PNG"),
        (Image.new("RGB", (40, 30), (1, 2, 3)), "WEBP"),
        (Image.new("RGB", (40, 30), (1, 2, 3)), "TIFF"),
    ],
)
def test_modes_become_rgb(img, fmt):
    out = decode(_bytes(img, fmt))
    assert out.mode == "RGB" and out.size == (40, 30)


def test_alpha_composites_over_white_and_16_bit_scales():
    assert decode(_bytes(Image.new("RGBA", (4, 4), (255, 0, 0, 0)), "PNG")).getpixel((0, 0)) == (255, 255, 255)
    assert decode(_bytes(Image.new("RGBA", (4, 4), (255, 0, 0, 255)), "PNG")).getpixel((0, 0)) == (255, 0, 0)
    assert decode(_bytes(Image.new("I;16", (4, 4), 65535), "PNG")).getpixel((0, 0)) == (255, 255, 255)


def test_palette_with_transparency_goes_white():
    p = Image.new("P", (8, 8), 0)
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    p.putpixel((0, 0), 1)
    data = _bytes(p, "PNG", transparency=0)
    out = decode(data)
    assert out.getpixel((5, 5)) == (255, 255, 255) and out.getpixel((0, 0)) == (0, 255, 0)


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    assert decode(buf.getvalue()).getpixel((8, 8)) == (255, 0, 0)


# A 2x1 image "left red, right blue"; each EXIF orientation stores it differently.
@pytest.mark.parametrize("orientation", range(1, 9))
def test_all_eight_exif_orientations_come_out_upright(orientation):
    upright = Image.new("RGB", (64, 32), (255, 0, 0))
    upright.paste((0, 0, 255), (32, 0, 64, 32))
    stored = upright
    for op in EXIF_TRANSFORMS[orientation]:
        stored = stored.transpose(op)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _bytes(stored, "PNG", exif=exif.tobytes())
    out = decode(data)
    assert out.size == (64, 32) == upright_size(open_image(data))
    assert out.getpixel((4, 16)) == (255, 0, 0) and out.getpixel((60, 16)) == (0, 0, 255)


def test_jpeg_draft_mode_decodes_big_photos_small():
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (2400, 3200, 3), dtype=np.uint8))
    data = _bytes(big, "JPEG", quality=80)
    assert decode(data).size == (3200, 2400)
    small = decode(data, min_side=256)
    assert small.size == (400, 300)  # 1/8 DCT scale, still >= 256 on the short side
    assert min(small.size) >= 256


def test_model_input_shape(tmp_path):
    p = tmp_path / "x.jpg"
    Image.new("RGB", (640, 480), (9, 9, 9)).save(p)
    arr = load_for_model(p)
    assert arr.shape == (224, 224, 3) and arr.dtype == np.uint8


def _png_header_only(width, height):
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_bad_inputs_have_precise_reasons(tmp_path):
    good = _bytes(Image.new("RGB", (300, 300), (200, 10, 10)), "JPEG")
    png = _bytes(Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 300, 3), dtype=np.uint8)), "PNG")
    assert _code(read_bytes, tmp_path / "nope.jpg") == "missing"
    assert _code(read_bytes, tmp_path) == "not_a_file"
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert _code(read_bytes, tmp_path / "empty.jpg") == "empty"
    (tmp_path / "big.jpg").write_bytes(good)
    assert _code(read_bytes, tmp_path / "big.jpg", max_bytes=100) == "too_large_file"
    assert _code(decode, b"just some text, not a photo") == "not_an_image"
    assert _code(decode, good[: len(good) // 2]) == "truncated"
    assert _code(decode, png[: len(png) // 2]) == "truncated"
    assert _code(decode, _png_header_only(100_000, 100_000)) == "too_large"  # bomb: 1e10 pixels, 100 bytes
    assert _code(decode, good, max_pixels=1000) == "too_large"
    assert _code(decode, b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64) == "unsupported_format"
    assert _code(decode, b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"></svg>') == "unsupported_format"


def test_unreadable_file(tmp_path):
    """Permission denied is ``unreadable``. Root reads everything, so as root the
    read happens in a forked child that has dropped to the ``nobody`` user."""
    p = tmp_path / "locked.jpg"
    p.write_bytes(b"x")
    p.chmod(0)
    if os.geteuid() != 0:
        assert _code(read_bytes, p) == "unreadable"
        return
    tmp_path.chmod(0o755)
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        status = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            read_bytes(p)
        except DecodeError as exc:
            status = 0 if exc.code == "unreadable" else 2
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_the_trims_thumbnail_is_pillows_without_its_copy():
    # The trim's box, and so every hash of the product, is made on this thumbnail: its size must stay
    # Pillow's own, whatever the aspect ratio.
    rng = np.random.default_rng(0)
    for w, h in [(1, 1), (256, 256), (257, 256), (300, 372), (4000, 3), (3, 4000), (1023, 767)] + [
            tuple(int(v) for v in rng.integers(1, 3000, 2)) for _ in range(300)]:
        im = Image.new("L", (w, h))
        im.thumbnail((256, 256))
        assert thumbnail_size((w, h), 256) == im.size, (w, h)
    photo = Image.new("RGB", (600, 400), "white")
    photo.paste((200, 30, 30), (200, 100, 380, 300))
    w, h = trim_background(photo).size  # the product, and the few pixels the thumbnail's blur adds
    assert 180 <= w <= 190 and 200 <= h <= 210


def test_a_jpegs_quality_is_read_from_its_tables():
    """``encoding_quality`` (which of two copies of one size dedupe keeps) gives back the quality Pillow saved
    every JPEG with, from the header alone, and 100 for a lossless PNG."""
    from pipeline.stages.decode import encoding_quality

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    for quality in range(1, 101):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        assert encoding_quality(Image.open(buf)) == quality
    buf = io.BytesIO()
    img.save(buf, "PNG")
    assert encoding_quality(Image.open(buf)) == 100
