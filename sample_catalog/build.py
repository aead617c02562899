"""Rebuild sample_catalog/: a small, believable shop night with every kind of trouble.

Sources (both BSD-3, notices in sample_catalog/LICENSES.md):
- product photos from the ``saleor==2.10.1`` wheel (saleor/static/placeholders/),
  fetched with ``pip download`` (PyPI only, no other network);
- scikit-image's bundled photos (astronaut, Chelsea the cat, coffee, rocket)
  as the non-product junk a folder picks up.

Usage: ``python sample_catalog/build.py`` (needs pip access to PyPI and
scikit-image installed). The output is deterministic for a given Pillow.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent
IMAGES = HERE / "images"
SIDE = 480  # downscaled so the committed catalogue stays small
PLACEHOLDERS = "saleor/static/placeholders/"

# folder, saleor file stem, sku, title, price
PRODUCTS = [
    ("hoodies", "cl_bogo01_1", "HD-001-BLK", "Saleor hoodie, black", "49.00"),
    ("hoodies", "cl_bogo02_1", "HD-001-BLU", "Saleor hoodie, blue", "49.00"),
    ("hoodies", "cl_bogo03_1", "HD-001-ORG", "Saleor hoodie, orange", "49.00"),
    ("hoodies", "cl_bogo04_1", "HD-001-WHT", "Saleor hoodie, white", "49.00"),
    ("hoodies", "cl_bogo04_2", "HD-001-WHT", "Saleor hoodie, white, detail", "49.00"),
    ("t-shirts", "cl_boot01_1", "TS-010-RED", "Less is more tee, red", "19.00"),
    ("t-shirts", "cl_boot03_1", "TS-011-TEA", "Road trip tee, teal", "19.00"),
    ("t-shirts", "cl_boot06_1", "TS-012-WHT", "Wave tee, white", "21.00"),
    ("t-shirts", "cl_boot07_1", "TS-013-BLK", "Code division tee, black", "21.00"),
    ("t-shirts", "cl_boot03_2", "TS-011-TEA", "Road trip tee, teal, back", "19.00"),
    ("polos", "cl_polo01", "PL-020-BLK", "Pattern polo, black", "35.00"),
    ("polos", "cl_polo02", "PL-020-WHT", "Pattern polo, white", "35.00"),
    ("polos", "cl_polo03-woman", "PL-021-WHT", "Women's polo, white", "35.00"),
    ("polos", "cl_polo04-woman", "PL-021-BLK", "Women's polo, black", "35.00"),
    ("sneakers", "sneakers_01_1", "SN-030-YEL", "Sprinkles slip-on, yellow", "59.00"),
    ("sneakers", "sneakers_01_3", "SN-030-YEL", "Sprinkles slip-on, yellow, side", "59.00"),
    ("sneakers", "sneakers_02_2", "SN-031-WHT", "Sprinkles slip-on, white", "59.00"),
    ("sneakers", "sneakers_02_3", "SN-031-WHT", "Sprinkles slip-on, white, pair", "59.00"),
    ("cushions", "cuschion01", "CU-040-BRD", "Bird cushion, navy", "25.00"),
    ("cushions", "cuschion02", "CU-041-LNE", "Line cushion, white", "25.00"),
    ("juices", "fd_juice_01", "JU-050-BAN", "Banana juice", "3.50"),
    ("juices", "fd_juice_02", "JU-051-BEA", "Beans juice", "3.50"),
    ("juices", "fd_juice_03", "JU-052-POW", "Power juice", "3.50"),
    ("juices", "fd_juice_05", "JU-053-CAR", "Carrot juice", "3.50"),
    ("juices", "fd_juice_06", "JU-054-ORA", "Orange juice", "3.50"),
    ("paints", "paints_01", "PA-060-NSK", "Paint, Nebula Night Sky", "12.00"),
    ("paints", "paints_03", "PA-062-RED", "Paint, Red Dwarf Red", "12.00"),
    ("paints", "paints_04", "PA-063-YEL", "Paint, Light Speed Yellow", "12.00"),
    ("beer", "beer-01_1", "BE-070-STR", "Sea Monster stout", "4.20"),
    ("beer", "beer-02_2", "BE-071-LAG", "Sea Monster lager, glass", "4.20"),
    ("wine", "wine-red", "WI-080-RED", "House red", "11.00"),
    ("wine", "wine-white", "WI-081-WHT", "House white", "11.00"),
]


def fetch_saleor(workdir: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--python-version", "3.8", "--only-binary", ":all:",
         "saleor==2.10.1", "-d", str(workdir), "-q"],
        check=True,
    )
    wheel = next(workdir.glob("saleor-2.10.1-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.startswith(PLACEHOLDERS) or name.endswith("dist-info/LICENSE"):
                zf.extract(name, workdir)
    return workdir


def flatten(img: Image.Image) -> Image.Image:
    """Transparent Saleor PNGs → RGB on white, as a shop's JPEG export would be."""
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def sale_badge(img: Image.Image, area: float = 0.08, centred: bool = False) -> Image.Image:
    """``img`` with an opaque red 'SALE' badge over ``area`` of it, in its top-right corner, as shops stamp
    photos: the copy that no hash of labelcat's finds, only the copy check after the model. ``centred``
    puts the same badge in the middle instead, where it stands for another print on the same article."""
    out = img.copy()
    w = round((area * img.width * img.height * 2) ** 0.5)
    badge = Image.new("RGB", (w, w // 2), (210, 30, 40))
    ImageDraw.Draw(badge).text((w * 0.12, w * 0.1), "SALE", font=ImageFont.load_default(size=max(10, w // 4)),
                                fill=(255, 255, 255))
    if centred:
        out.paste(badge, ((img.width - w) // 2, (img.height - w // 2) // 2))
    else:
        out.paste(badge, (img.width - w - img.width // 40, img.height // 40))
    return out


def save_jpeg(img: Image.Image, path: Path, quality: int = 88, exif: Image.Exif | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"exif": exif.tobytes()} if exif is not None else {}
    img.save(path, "JPEG", quality=quality, optimize=True, **kwargs)


def build() -> None:
    from skimage import data as skdata

    if IMAGES.exists():
        shutil.rmtree(IMAGES)
    rows: list[list[str]] = []

    def add(folder: str, name: str, sku: str, hint: str | None, title: str, price: str, note: str) -> None:
        rows.append([sku, f"images/{folder}/{name}", hint or "", title, price, note])

    with tempfile.TemporaryDirectory() as tmp:
        src = fetch_saleor(Path(tmp))
        shutil.copy(next(src.glob("saleor-2.10.1.dist-info/LICENSE")), HERE / "LICENSE.saleor")
        originals: dict[str, Image.Image] = {}
        for folder, stem, sku, title, price in PRODUCTS:
            img = flatten(Image.open(src / PLACEHOLDERS / f"saleordemoproduct_{stem}.png"))
            img.thumbnail((SIDE, SIDE), Image.LANCZOS)
            originals[stem] = img
            save_jpeg(img, IMAGES / folder / f"{stem}.jpg")
            add(folder, f"{stem}.jpg", sku, folder, title, price, "product")

    # Duplicates: exact copy, re-encode, resize, crop, EXIF rotation.
    shutil.copy(IMAGES / "hoodies/cl_bogo02_1.jpg", IMAGES / "hoodies/cl_bogo02_1_copy.jpg")
    add("hoodies", "cl_bogo02_1_copy.jpg", "HD-001-BLU", "hoodies", "Saleor hoodie, blue (uploaded twice)", "49.00", "exact duplicate")
    save_jpeg(originals["cl_polo02"], IMAGES / "polos/cl_polo02_q60.jpg", quality=60)
    add("polos", "cl_polo02_q60.jpg", "PL-020-WHT", "polos", "Pattern polo, white (re-encoded)", "35.00", "near duplicate: re-encoded")
    small = originals["sneakers_02_2"].resize((SIDE // 2, SIDE // 2), Image.LANCZOS)
    save_jpeg(small, IMAGES / "sneakers/sneakers_02_2_small.jpg")
    add("sneakers", "sneakers_02_2_small.jpg", "SN-031-WHT", "sneakers", "Sprinkles slip-on, white (thumbnail)", "59.00", "near duplicate: resized")
    o = originals["fd_juice_02"]
    crop = o.crop((int(o.width * 0.05), int(o.height * 0.05), int(o.width * 0.95), int(o.height * 0.95)))
    save_jpeg(crop, IMAGES / "juices/fd_juice_02_crop.jpg")
    add("juices", "fd_juice_02_crop.jpg", "JU-051-BEA", "juices", "Beans juice (cropped)", "3.50", "near duplicate: cropped")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": store the pixels rotated the other way
    save_jpeg(originals["cuschion01"].rotate(90, expand=True), IMAGES / "cushions/cuschion01_phone.jpg", exif=exif)
    add("cushions", "cuschion01_phone.jpg", "CU-040-BRD", "cushions", "Bird cushion (phone upload)", "25.00", "near duplicate: EXIF-rotated")

    # Junk: non-products in product folders, a blank upload, a tiny image, a product in the wrong folder.
    for folder, name, photo, note in [
        ("t-shirts", "astronaut.jpg", skdata.astronaut(), "junk: not a product (astronaut)"),
        ("cushions", "cat.jpg", skdata.chelsea(), "junk: not a product (cat)"),
        ("paints", "rocket.jpg", skdata.rocket(), "junk: not a product (rocket)"),
    ]:
        img = Image.fromarray(photo).convert("RGB")
        img.thumbnail((SIDE, SIDE), Image.LANCZOS)
        save_jpeg(img, IMAGES / folder / name)
        add(folder, name, "", folder, "", "", note)
    save_jpeg(Image.new("RGB", (SIDE, SIDE), (250, 250, 250)), IMAGES / "sneakers/blank.jpg")
    add("sneakers", "blank.jpg", "SN-032-GRY", "sneakers", "placeholder upload", "59.00", "junk: blank")
    save_jpeg(originals["wine-red"].resize((40, 40), Image.LANCZOS), IMAGES / "wine/wine-red_icon.jpg")
    add("wine", "wine-red_icon.jpg", "WI-080-RED", "wine", "House red (icon)", "11.00", "junk: too small")
    # A close-up of a sneaker (its front two thirds, mirrored), so it is a product in the wrong folder rather
    # than a copy: a plain mirror image of a catalogue photo is found as a near duplicate.
    o = originals["sneakers_01_3"]
    closeup = o.crop((0, 0, int(o.width * 0.64), o.height)).transpose(Image.FLIP_LEFT_RIGHT)
    save_jpeg(closeup, IMAGES / "hoodies/sneakers_misfiled.jpg")
    add("hoodies", "sneakers_misfiled.jpg", "HD-002-YEL", "hoodies", "Yellow hoodie (wrong photo)", "49.00", "junk: product in the wrong folder")
    coffee = Image.fromarray(skdata.coffee()).convert("RGB")
    coffee.thumbnail((SIDE, SIDE), Image.LANCZOS)
    save_jpeg(coffee, IMAGES / "juices/espresso.jpg")
    add("juices", "espresso.jpg", "JU-055-ESP", "juices", "Espresso to go", "2.80", "product (photo of a cup of coffee)")

    # Broken files.
    (IMAGES / "beer/empty.jpg").write_bytes(b"")
    add("beer", "empty.jpg", "BE-072-IPA", "beer", "IPA (upload failed)", "4.50", "error: zero bytes")
    whole = (IMAGES / "beer/beer-01_1.jpg").read_bytes()
    (IMAGES / "beer/truncated.jpg").write_bytes(whole[: len(whole) // 3])
    add("beer", "truncated.jpg", "BE-073-PIL", "beer", "Pilsner (upload cut off)", "4.20", "error: truncated JPEG")
    (IMAGES / "wine/notes.jpg").write_text("tasting notes: dry, cherry, oak\n", encoding="utf-8")
    add("wine", "notes.jpg", "WI-082-ROS", "wine", "Rose (text file named .jpg)", "10.00", "error: not an image")
    add("wine", "missing.jpg", "WI-083-SPK", "wine", "Sparkling (photo never uploaded)", "14.00", "error: missing file")

    # A copy that only the copy check after the model finds (a badge moves every hash past its radius).
    save_jpeg(sale_badge(originals["beer-01_1"]), IMAGES / "beer/beer-01_1_sale.jpg")
    add("beer", "beer-01_1_sale.jpg", "BE-070-STR", "beer", "Sea Monster stout (SALE badge)", "4.20",
        "near duplicate: logo badge")

    with open(HERE / "manifest.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["sku", "path", "category_hint", "title", "price", "expected"])
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {HERE / 'manifest.csv'}; images under {IMAGES}")


if __name__ == "__main__":
    build()
