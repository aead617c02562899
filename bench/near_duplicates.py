"""Near duplicates on real photos: recall and false pairs per kind of copy, beside imagededup and cleanvision.

Originals, all from registry packages: every product photo of the ``saleor==2.10.1`` wheel (45, on plain
backdrops), the shuup cosmetics and Venia dresses of ``bench/decisions.py`` (22 shop photos, added in session
10) and scikit-image's bundled photos (full-frame scenes), split once by name into a *development* part (the
Saleor photos ``sample_catalog/`` is built from, every other shuup and Venia photo, and half of scikit-image's)
and a *test* part never looked at while tuning; a third part, ``gcompris``, never tuned on either (added in session 16
and measured once): the 45 tool and kitchen photos of Debian's ``gcompris-qt-data`` and every third of its 117
non-product photos (``bench/decisions.py --gcompris``). From each original the script makes copies (they must merge with it) and colour
variants (other articles to a shop: they must not), writes them all to one folder and hands the same files to

- labelcat: ``ingest`` and ``scan_records`` (one decode, every hash) and ``find_duplicates`` with the default thresholds
  (the hashes and the aligned check, before the model), then, as the runners do, the default model on the photos
  kept and ``copies.find_copies`` on their features (the copy check after the model);
- imagededup 0.3.3 PHash at its default distance 10 (CNN needs torch, not installed here);
- cleanvision 0.3.7 ``near_duplicates`` and ``exact_duplicates`` at their defaults.

With the test part, the four colourways of Cartridge's test product (``colourways``) must stay apart too.
A copy counts as found when a chain of pairs inside its own group links it to its original; a false pair is
a pair across groups (two distinct photos, or a variant and its original). Peers are optional: install them
with ``pip install cleanvision==0.3.7 PyWavelets scikit-learn matplotlib && pip install --no-deps
imagededup==0.3.3.post2`` (imagededup's hashing is loaded without its torch-only modules).
Usage: ``python bench/near_duplicates.py [--part dev|test|all|gcompris]``; prints the README table and hashing rates.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
import types
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "sample_catalog"))

from build import flatten, sale_badge
from decisions import gcompris_photos, more_shop_photos, pypi_file, saleor_photos, skimage_photos, tar_members

from pipeline.models.classifier import load_classifier
from pipeline.stages.classify import predict
from pipeline.stages.copies import EmbeddingIndex, classified_photos, find_copies
from pipeline.stages.dedupe import find_duplicates
from pipeline.stages.ingest import ingest
from pipeline.stages.scan import candidate, scan_records

MAX_PIXELS, MAX_BYTES = 50_000_000, 50_000_000


def _crop(img: Image.Image, side: float) -> Image.Image:
    dx, dy = round(img.width * side), round(img.height * side)
    return img.crop((dx, dy, img.width - dx, img.height - dy))


def _brightness(img: Image.Image, factor: float) -> Image.Image:
    return ImageEnhance.Brightness(img).enhance(factor)


def _watermark(img: Image.Image) -> Image.Image:
    """Semi-transparent shop name across the lower third, the way marketplaces stamp photos."""
    out = img.convert("RGBA")
    layer = Image.new("RGBA", out.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    font = ImageFont.load_default(size=max(12, img.width // 14))
    draw.text((img.width * 0.08, img.height * 0.72), "© myshop.example", font=font, fill=(255, 255, 255, 170),
              stroke_width=1, stroke_fill=(0, 0, 0, 120))
    return Image.alpha_composite(out, layer).convert("RGB")


def _hue_turn(img: Image.Image, degrees: float) -> Image.Image:
    """The product (not a white backdrop) recoloured by a hue turn: another colourway of the article."""
    hsv = np.asarray(img.convert("HSV")).astype(np.int16)
    product = np.asarray(img).min(axis=-1) < 235
    hsv[..., 0] = np.where(product, (hsv[..., 0] + round(degrees / 360 * 256)) % 256, hsv[..., 0])
    return Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")


# kind -> (make, file format, save options); EXIF rotation is written separately
COPIES: dict[str, tuple[Callable[[Image.Image], Image.Image], str, dict]] = {
    "jpeg q35": (lambda im: im, "JPEG", {"quality": 35}),
    "half size": (lambda im: im.resize((im.width // 2, im.height // 2), Image.LANCZOS), "JPEG", {"quality": 90}),
    "crop 4%/side": (lambda im: _crop(im, 0.04), "JPEG", {"quality": 90}),
    "crop 8%/side": (lambda im: _crop(im, 0.08), "JPEG", {"quality": 90}),
    "PNG": (lambda im: im, "PNG", {}),
    "WebP": (lambda im: im, "WEBP", {"quality": 80}),
    "EXIF-rotated": (lambda im: im.transpose(Image.ROTATE_90), "JPEG", {"quality": 90}),
    "pixels rotated 90°": (lambda im: im.transpose(Image.ROTATE_270), "JPEG", {"quality": 90}),
    "mirrored": (lambda im: im.transpose(Image.FLIP_LEFT_RIGHT), "JPEG", {"quality": 90}),
    "brightness -15%": (lambda im: _brightness(im, 0.85), "JPEG", {"quality": 90}),
    "brightness +15%": (lambda im: _brightness(im, 1.15), "JPEG", {"quality": 90}),
    "text watermark": (_watermark, "JPEG", {"quality": 90}),
    "logo overlay 8%": (sale_badge, "JPEG", {"quality": 90}),
}
VARIANTS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "hue turned 30°": lambda im: _hue_turn(im, 30),
    "hue turned 60°": lambda im: _hue_turn(im, 60),
    "greyscale": lambda im: im.convert("L").convert("RGB"),
}
EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
VISIBLE_DELTA_E = 10.0  # mean CIELAB distance over the product's pixels from which a recolouring is another article


def visibly_recoloured(img: Image.Image, variant: Image.Image) -> bool:
    """Whether a person would call ``variant`` another colourway: a hue turn of a white shirt or a grey
    wine bottle changes nothing visible, and such "variants" are copies, not test cases."""
    from pipeline.stages.dedupe import lab

    a, b = np.asarray(img, np.float64) / 255.0, np.asarray(variant, np.float64) / 255.0
    product = np.asarray(img).min(axis=-1) < 235
    delta = np.sqrt(((lab(a) - lab(b)) ** 2).sum(axis=-1))
    return bool(product.any()) and float(delta[product].mean()) >= VISIBLE_DELTA_E


def originals(workdir: Path, part: str) -> list[tuple[str, Image.Image]]:
    """(name, RGB image) of every original in ``part``: Saleor products, then scikit-image scenes (or, for
    ``gcompris``, GCompris's products, then every third of its non-products)."""
    if part == "gcompris":
        products, others = gcompris_photos(workdir)
        return [(p.stem, Image.open(p).convert("RGB")) for p in [p for p, _, _ in products] + others[::3]]
    out = [(p.stem.removeprefix("saleordemoproduct_"), flatten(Image.open(p)))  # on white, as the shop shows them
           for p, _, split in saleor_photos(workdir) if part in ("all", split)]
    out += [(f"{folder}_{p.stem}", Image.open(p).convert("RGB"))
            for p, folder, split in more_shop_photos(workdir) if part in ("all", split)]
    scenes = skimage_photos(workdir)
    for i, p in enumerate(scenes):
        if part == "all" or (i % 2 == 0) == (part == "dev"):
            out.append((p.stem, Image.open(p).convert("RGB")))
    return out


def colourways(workdir: Path) -> list[tuple[str, Image.Image]]:
    """(colour, RGB on white) of a real shop package's one article in four colourways: the drawn test product of
    ``Cartridge==1.3.4`` (Mezzanine's shop), blue, green, red and yellow. Genuinely different products to a
    shop, made by its designer rather than by a hue turn of ours; none may merge with another."""
    sdist = pypi_file("Cartridge", "Cartridge-1.3.4.tar.gz",
                      "badcb3f08c7be1c0d371195fcf017562b95898cad8931c49fa7faff7a5ef78ae", workdir)
    return [(path.stem, flatten(Image.open(path)))
            for path in tar_members(sdist, "Cartridge-1.3.4/cartridge/shop/static/test/product/", ".png", workdir)]


def build(folder: Path, sources: list[tuple[str, Image.Image]],
          colours: list[tuple[str, Image.Image]] = ()) -> dict[str, tuple[str, str]]:
    """Write originals, copies and variants, and ``colours`` (an article's colourways), into ``folder``; file
    name -> (group, kind)."""
    truth: dict[str, tuple[str, str]] = {}

    def save(img: Image.Image, name: str, group: str, kind: str, fmt: str = "JPEG", **opts) -> None:
        file = f"{name}.{EXT[fmt]}"
        img.save(folder / file, fmt, **opts)
        truth[file] = (group, kind)

    for i, (name, img) in enumerate(sources):
        save(img, f"{i:03d}_original", name, "original", quality=95)
        for k, (kind, (make, fmt, opts)) in enumerate(COPIES.items()):
            copy = make(img)
            if kind == "EXIF-rotated":  # pixels turned, orientation tag turns them back
                exif = Image.Exif()
                exif[0x0112] = 6
                opts = {**opts, "exif": exif.tobytes()}
            save(copy, f"{i:03d}_copy{k:02d}", name, kind, fmt, **opts)
        for k, (kind, make) in enumerate(VARIANTS.items()):
            variant = make(img)
            if visibly_recoloured(img, variant):
                save(variant, f"{i:03d}_variant{k}", f"{name}/{kind}", kind, quality=90)
    for colour, img in colours:
        save(img, f"colourway_{colour}", f"colourway/{colour}", "colourway", quality=90)
    return truth


def score(pairs: set[frozenset[str]], truth: dict[str, tuple[str, str]],
          kinds: Iterable[str] = COPIES) -> tuple[dict[str, tuple[int, int]], int, int]:
    """Per copy kind (found, total); false pairs across groups; of which variant-to-original merges."""
    parent = {f: f for f in truth}

    def root(f: str) -> str:
        while parent[f] != f:
            parent[f] = parent[parent[f]]
            f = parent[f]
        return f

    false = variant_false = 0
    for pair in pairs:
        a, b = sorted(pair)
        if truth[a][0] == truth[b][0]:
            parent[root(a)] = root(b)
        else:
            false += 1
            variant_false += truth[a][0].split("/")[0] == truth[b][0].split("/")[0]
    origin = {g: f for f, (g, kind) in truth.items() if kind == "original"}
    found: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for f, (group, kind) in truth.items():
        if kind in kinds:
            found[kind][1] += 1
            found[kind][0] += root(f) == root(origin[group])
    return {k: (found[k][0], found[k][1]) for k in kinds}, false, variant_false


def labelcat_pairs(folder: Path) -> tuple[set[frozenset[str]], set[frozenset[str]], float]:
    """Pairs from labelcat's own ingest, scan and dedupe (before the model), and those pairs with the copy
    check's after the model; seconds spent scanning (decode and every hash)."""
    records = list(ingest(folder).records)
    start = time.perf_counter()
    scans = scan_records(records, MAX_PIXELS, MAX_BYTES)
    seconds = time.perf_counter() - start
    name = {r.row: r.resolved.name for r in records}
    cands = [candidate(row, s) for row, s in scans.items()]
    matches = find_duplicates(cands)
    hashed = {frozenset((name[m.row], name[m.kept])) for m in matches.values()}
    kept = [row for row in scans if row not in matches]
    clf = load_classifier("efficientnet_lite0")
    path = {r.row: r.resolved for r in records}
    preds = predict(clf, [path[row] for row in kept])
    photos = classified_photos(kept, [scans[row].width * scans[row].height for row in kept],
                               [scans[row].hashes.thumb for row in kept], preds.probs, preds.embeddings, clf.categories,
                               [scans[row].fidelity for row in kept])
    start = time.perf_counter()
    copies = find_copies(photos, EmbeddingIndex())
    print(f"copy check: {len(photos)} classified photos in {time.perf_counter() - start:.2f} s", file=sys.stderr)
    return hashed, hashed | {frozenset((name[m.row], name[m.kept])) for m in copies.values()}, seconds


def _imagededup_hashing():
    """imagededup's hashing module without its package __init__ (which imports torch for the CNN)."""
    import imagededup

    for sub in ("methods", "utils"):
        name = f"imagededup.{sub}"
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = [str(Path(imagededup.__file__).parent / sub)]
            sys.modules[name] = module
    return importlib.import_module("imagededup.methods.hashing")


def imagededup_pairs(folder: Path) -> tuple[set[frozenset[str]], float]:
    hashing = _imagededup_hashing()
    phash = hashing.PHash(verbose=False)
    start = time.perf_counter()
    encodings = phash.encode_images(image_dir=str(folder))
    seconds = time.perf_counter() - start
    dups = phash.find_duplicates(encoding_map=encodings, max_distance_threshold=10)
    return {frozenset((a, b)) for a, bs in dups.items() for b in bs}, seconds


def cleanvision_pairs(folder: Path) -> set[frozenset[str]]:
    from cleanvision import Imagelab

    lab = Imagelab(data_path=str(folder))
    lab.find_issues({"near_duplicates": {}, "exact_duplicates": {}}, verbose=False)
    pairs: set[frozenset[str]] = set()
    for issue in ("near_duplicates", "exact_duplicates"):
        for group in lab.info[issue]["sets"]:
            names = [Path(p).name for p in group]
            pairs |= {frozenset((a, b)) for i, a in enumerate(names) for b in names[i + 1:]}
    return pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["dev", "test", "all", "gcompris"], default="all")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work, folder = Path(tmp) / "src", Path(tmp) / "photos"
        work.mkdir()
        folder.mkdir()
        sources = originals(work, args.part)
        colours = colourways(work) if args.part in ("test", "all") else []
        truth = build(folder, sources, colours)
        hashed, both, seconds = labelcat_pairs(folder)
        results: dict[str, tuple[set[frozenset[str]], float | None]] = {
            "labelcat before the model": (hashed, seconds), "labelcat with the copy check": (both, None)}
        for name, fn in (("imagededup PHash", imagededup_pairs), ("cleanvision", lambda f: (cleanvision_pairs(f), None))):
            try:
                results[name] = fn(folder)
            except ImportError as exc:
                print(f"{name}: not installed ({exc})", file=sys.stderr)
    variants = sum(kind in VARIANTS for _, kind in truth.values())
    print(f"{len(sources)} originals ({args.part}), {len(truth)} files, {variants} visible colour variants "
          f"(mean product ΔE >= {VISIBLE_DELTA_E:g}); copies must merge, variants must not\n")
    scored = {name: score(pairs, truth) for name, (pairs, _) in results.items()}
    print("| kind | " + " | ".join(scored) + " |")
    print("|---|" + "---:|" * len(scored))
    n = len(sources)
    for kind in COPIES:
        print(f"| {kind} | " + " | ".join(f"{s[0][kind][0]}/{s[0][kind][1]}" for s in scored.values()) + " |")
    total = {name: sum(f for f, _ in s[0].values()) for name, s in scored.items()}
    print("| **all copies** | " + " | ".join(f"**{total[k]}/{n * len(COPIES)} ({total[k] / (n * len(COPIES)):.1%})**"
                                           for k in scored) + " |")
    print("| false pairs (variant with its original) | " + " | ".join(f"{s[1]} ({s[2]})" for s in scored.values()) + " |")
    if colours:
        names = [f for f, (_, kind) in truth.items() if kind == "colourway"]
        print(f"| genuine colourways ({len(names)} colours of Cartridge's test product), pairs merged | " + " | ".join(
            str(sum(frozenset((a, b)) in pairs for i, a in enumerate(names) for b in names[i + 1:]))
            for pairs, _ in results.values()) + " |")
    print()
    for name, (_, seconds) in results.items():
        if seconds:
            print(f"{name}: {len(truth) / seconds:.0f} photos/s hashed (decode included, {len(truth)} files)")


if __name__ == "__main__":
    main()
