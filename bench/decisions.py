"""Decisions on real photos: zero-shot accuracy, few-shot learning curves, junk recall and products lost.

Data, all from registry packages (PyPI, npm and Debian, through their own clients or indexes):
- every product photo of the ``saleor==2.10.1`` wheel (45 photos, 9 categories), split once by name into
  a *development* part (the photos ``sample_catalog/`` is built from, on which thresholds such as
  ``fewshot.OUTLIER_SIMILARITY`` were set) and a *test* part (the 13 Saleor photos sample_catalog leaves
  out, never looked at while tuning);
- 22 more real shop photos never seen before session 10, split once (alternately by file name) between the two
  parts: the 10 cosmetics product photos of the ``shuup==3.1.0`` wheel's sample data (folder ``beauty``) and the
  12 dress photos (worn by models, on white or grey) of npm ``@magento/venia-ui@11.7.3`` (folder ``dresses``);
- scikit-image's bundled photos as non-products (a cat, an astronaut, coffee, a rocket, a horse...);
- with ``--wallpapers``, a second set of non-products never looked at while tuning: the landscape and nature
  photos of Debian's ``mate-backgrounds`` and ``plasma-workspace-wallpapers`` (fetched with ``apt-get
  download``, 140 MB; their drawn and abstract wallpapers are left out, and so is a photo of cups);
- with ``--gcompris`` (added in session 15, measured once with the rules as they stood), the real photos of
  GCompris's sorting game (Debian ``gcompris-qt-data``, 44 MB; public domain, CC0 and CC-BY-SA photos from
  Wikimedia Commons and publicdomainpictures.net, credited in each folder's README): 39 photos of hand
  tools (hammers, pliers, tape measures, multimeters, scissors...: folder ``tools``) and 6 of tableware and
  cookware (folder ``kitchen``), split alternately by name like the shuup and Venia photos, and 117 more
  held-out non-products (33 animals, 28 fishes, 29 wind, water and solar power plants, 27 monuments).

One pass of EfficientNet-Lite0 through the classify stage gives every photo's zero-shot label and its
embedding; the few-shot rules then run on the embeddings (the same functions ``labelcat train`` uses). Junk is
measured twice: from each photo's own evidence, and on random folder trees (``folder_trees``,
``few_shot_trees``) with the runner's own functions, so the folder's evidence (outliers, a folder vouching
for a contradicted hint) counts as it does at night.
Usage: ``python bench/decisions.py [--splits 200] [--wallpapers] [--gcompris]``; prints the README tables.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "sample_catalog"))

from build import PLACEHOLDERS, fetch_saleor  # noqa: E402

from pipeline.learning.calibration import ece, softmax  # noqa: E402
from pipeline.learning.fewshot import (LOGIT_SCALE, OUTLIER_SIMILARITY, FewShotFit, centroid_rule, fit,  # noqa: E402
                                       open_set_card, taxonomy_prior)
from pipeline.learning.recipe import calibrate  # noqa: E402
from pipeline.models.embeddings import NEIGHBOURS, neighbour_votes, normalise  # noqa: E402
from pipeline.models.classifier import load_classifier  # noqa: E402
from pipeline.stages.classify import predict  # noqa: E402
from pipeline.stages.junk import (Catalogue, JunkConfig, folder_likeness, folder_verdict, hint_posterior,  # noqa: E402
                                  open_set_reason, photo_reason, sold_posterior, unfiled_hints)

FOLDER = {"beer": "beer", "cl_bogo": "hoodies", "cl_boot": "t-shirts", "cl_polo": "polos", "cuschion": "cushions",
          "fd_juice": "juices", "paints": "paints", "sneakers": "sneakers", "wine": "wine"}
NON_PRODUCTS = ("astronaut", "chelsea", "coffee", "rocket", "horse", "camera", "immunohistochemistry", "hubble_deep_field",
                "colorwheel", "logo", "retina", "brick", "grass", "moon")


def saleor_photos(workdir: Path) -> list[tuple[Path, str, str]]:
    """(png path, category folder, dev|test) for every Saleor product photo."""
    import csv

    fetch_saleor(workdir)
    in_catalogue = {Path(r["path"]).stem for r in csv.DictReader(open(ROOT / "sample_catalog" / "manifest.csv"))}
    out = []
    for png in sorted((workdir / PLACEHOLDERS).glob("saleordemoproduct_*.png")):
        stem = png.stem.removeprefix("saleordemoproduct_")
        folder = next(f for prefix, f in FOLDER.items() if stem.startswith(prefix))
        out.append((png, folder, "dev" if stem in in_catalogue else "test"))
    return out


def _fetch(cmd: list[str], cwd: Path) -> None:
    import subprocess

    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)


def pypi_file(project: str, filename: str, sha256: str, workdir: Path) -> Path:
    """One file of a PyPI release, found in the simple index and checked against its digest. ``pip download``
    cannot fetch shuup 3.1.0: newer pips refuse its non-standard dependency specifiers."""
    import hashlib
    import re
    import urllib.request
    from urllib.parse import urljoin

    index = f"https://pypi.org/simple/{project}/"
    page = urllib.request.urlopen(index, timeout=60).read().decode()
    href = re.search(rf'href="([^"]*/{re.escape(filename)}[^"]*)"', page)
    if href is None:
        raise SystemExit(f"{filename} is not in {index}")
    data = urllib.request.urlopen(urljoin(index, href.group(1)), timeout=300).read()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise SystemExit(f"{filename}: sha256 mismatch")
    path = workdir / filename
    path.write_bytes(data)
    return path


def tar_members(archive: Path, prefix: str, suffix: str, workdir: Path) -> list[Path]:
    """The files of a tar archive whose names start with ``prefix`` and end with ``suffix``, extracted into
    ``workdir`` (the archive's own paths, nothing outside it), sorted by name."""
    import tarfile

    with tarfile.open(archive) as tf:
        members = sorted((m for m in tf.getmembers() if m.name.startswith(prefix) and m.name.endswith(suffix)),
                         key=lambda m: m.name)
        tf.extractall(workdir, members=members, filter="data")
    return [workdir / m.name for m in members]


def more_shop_photos(workdir: Path) -> list[tuple[Path, str, str]]:
    """(path, category folder, dev|test) for the shuup cosmetics and the Venia dresses, every other photo of
    each set (sorted by name) in the test part."""
    import zipfile

    wheel = pypi_file("shuup", "shuup-3.1.0-py2.py3-none-any.whl",
                      "535b41374d3288261206cb3ffba2a4565a54bd8c30d88e0143e81388e03b78cb", workdir)
    with zipfile.ZipFile(wheel) as zf:
        beauty = [Path(zf.extract(n, workdir)) for n in sorted(zf.namelist())
                  if n.startswith("shuup/testing/modules/sample_data/images/default/product")]
    _fetch(["npm", "pack", "-q", "@magento/venia-ui@11.7.3"], workdir)
    dresses = tar_members(workdir / "magento-venia-ui-11.7.3.tgz", "package/lib/RootComponents/Category/images/", ".jpg",
                          workdir)
    assert len(beauty) == 10 and len(dresses) == 12, (len(beauty), len(dresses))
    return [(path, folder, ("dev", "test")[i % 2]) for folder, paths in (("beauty", beauty), ("dresses", dresses))
            for i, path in enumerate(paths)]


def skimage_photos(workdir: Path) -> list[Path]:
    from skimage import data

    paths = []
    for name in NON_PRODUCTS:
        img = getattr(data, name)()
        arr = np.asarray(img)
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        path = workdir / f"{name}.png"
        Image.fromarray(arr).convert("RGB").save(path)
        paths.append(path)
    return paths


#: Debian desktop wallpapers that are photographs (the rest are drawn or abstract): plasma's by folder name,
#: all twelve of mate-backgrounds' nature photos. A flower photo is a non-product here because none of the
#: bench's categories is plants.
PLASMA_PHOTOS = ("BytheWater", "ColdRipple", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey", "Kite", "OneStandsOut",
                 "Path", "summer_1am")


def unpack_deb(pkg: str, workdir: Path) -> Path:
    """Fetch Debian package ``pkg`` with ``apt-get download`` and unpack it into ``workdir / "debs"``, the
    root returned (packages unpacked there share it)."""
    import subprocess

    _fetch(["apt-get", "download", "-q", pkg], workdir)
    deb = next(workdir.glob(f"{pkg}_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(workdir / "debs")], check=True)
    return workdir / "debs"


def wallpaper_photos(workdir: Path) -> list[Path]:
    """Held-out non-products: photographic wallpapers of two Debian packages, unpacked into ``workdir``."""
    for pkg in ("mate-backgrounds", "plasma-workspace-wallpapers"):
        share = unpack_deb(pkg, workdir) / "usr" / "share"  # the same root for both
    plasma = [min((share / "wallpapers" / name / "contents" / "images").iterdir(), key=lambda p: p.stat().st_size)
              for name in PLASMA_PHOTOS]
    return plasma + sorted((share / "backgrounds" / "mate" / "nature").glob("*.jpg"))


#: GCompris's sorting game (``categorization.rcc``): its tools folder, the tableware and cookware of its
#: "others" folder, and the folders of photos that show no product.
GCOMPRIS_KITCHEN = ("buffetset", "cup", "knife", "pan", "plate", "spoons")
GCOMPRIS_NON_PRODUCTS = ("fishes", "monuments", "renewable")


def qt_resources(rcc: Path) -> dict[str, bytes]:
    """{path: bytes} of a Qt binary resource file (``rcc`` format 1-3: a tree of 14- or 22-byte nodes, UTF-16
    names, zlib-compressed or stored payloads), so the photos GCompris packs can be read without Qt."""
    import struct
    import zlib

    b = rcc.read_bytes()
    if b[:4] != b"qres":
        raise SystemExit(f"{rcc} is not a Qt resource file")
    version, tree, data, names = struct.unpack(">IIII", b[4:20])
    node = 14 if version == 1 else 22
    out: dict[str, bytes] = {}

    def name(offset: int) -> str:
        (length,) = struct.unpack(">H", b[names + offset:names + offset + 2])
        return b[names + offset + 6:names + offset + 6 + 2 * length].decode("utf-16-be")

    def walk(index: int, prefix: str) -> None:
        at = tree + index * node
        name_offset, flags = struct.unpack(">IH", b[at:at + 6])
        path = f"{prefix}/{name(name_offset)}" if index else ""
        if flags & 2:  # a directory: its children are consecutive nodes
            count, first = struct.unpack(">II", b[at + 6:at + 14])
            for child in range(first, first + count):
                walk(child, path)
            return
        (offset,) = struct.unpack(">I", b[at + 10:at + 14])
        (size,) = struct.unpack(">I", b[data + offset:data + offset + 4])
        payload = b[data + offset + 4:data + offset + 4 + size]
        if flags & 4:
            raise SystemExit(f"{rcc}: {path} is zstd-compressed; not supported here")
        out[path.lstrip("/")] = zlib.decompress(payload[4:]) if flags & 1 else payload

    walk(0, "")
    return out


def gcompris_photos(workdir: Path) -> tuple[list[tuple[Path, str, str]], list[Path]]:
    """(products as (path, folder, dev|test), held-out non-products) from Debian's ``gcompris-qt-data``."""
    rcc = unpack_deb("gcompris-qt-data", workdir) / "usr" / "share" / "gcompris-qt" / "rcc"
    files = {**qt_resources(rcc / "categorization.rcc"), **qt_resources(rcc / "erase.rcc")}
    by_folder: dict[str, list[Path]] = {}
    for member, payload in sorted(files.items()):
        folder, stem = Path(member).parent.name, Path(member).stem
        if not member.endswith(".webp") or folder == "others" and stem not in GCOMPRIS_KITCHEN:
            continue
        folder = {"others": "kitchen", "resource": "animals"}.get(folder, folder)
        path = workdir / "gcompris-photos" / folder / Path(member).name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
        by_folder.setdefault(folder, []).append(path)
    assert len(by_folder["tools"]) == 39 and len(by_folder["kitchen"]) == 6, {k: len(v) for k, v in by_folder.items()}
    products = [(path, folder, ("dev", "test")[i % 2]) for folder in ("tools", "kitchen")
                for i, path in enumerate(by_folder[folder])]
    return products, [p for folder in ("animals", *GCOMPRIS_NON_PRODUCTS) for p in by_folder[folder]]


def draw_split(rng: np.random.Generator, y: np.ndarray, classes: list, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One random few-shot split: ``k`` training photos of each of ``classes``, and the rest of those classes'
    photos held out (in index order)."""
    train = np.concatenate([rng.choice(np.flatnonzero(y == c), k, replace=False) for c in classes])
    return train, np.setdiff1d(np.flatnonzero(np.isin(y, classes)), train)


def card_temperature(f, y_train: np.ndarray, n: int) -> float:
    """The temperature ``labelcat train`` writes in the card: fitted on the out-of-fold scores (T = 1 without)."""
    oof = f.cv["oof_logits"]
    return calibrate(oof.astype(np.float64), y_train, [str(c) for c in range(n)], 0.95)["temperature"] \
        if oof is not None else 1.0


#: (classes) -> the (photos, classes) ``TaxonomyPrior.log_prior`` of every photo the bench classified, or None
#: when the classes' folders do not all name taxonomy categories: what ``labelcat train`` adds to the logits
PriorOf = Callable[[list[int]], "np.ndarray | None"]


def shop_fit(emb: np.ndarray, yk: np.ndarray, train: np.ndarray, n: int, prior: np.ndarray | None,
             method: str = "auto") -> FewShotFit:
    """The few-shot head as ``labelcat train`` fits it on the ``train`` rows (with the taxonomy prior's rows
    of them, when the classes have one)."""
    return fit(emb[train], yk[train], np.arange(len(train)), n, method,
               prior=None if prior is None else prior[train])


def shop_logits(f: FewShotFit, z: np.ndarray, prior: np.ndarray | None, rows) -> np.ndarray:
    """A trained shop model's logits on features ``z`` (``f.embed`` of the pooled ones), the photos ``rows``
    of ``prior`` (every photo's prior, or None)."""
    logits = z @ f.weights + f.bias
    return logits + f.prior_weight * prior[rows] if prior is not None and f.prior_weight else logits


def few_shot_curve(emb: np.ndarray, y: np.ndarray, ks: list[int], splits: int, seed: int = 0,
                   prior_of: PriorOf | None = None) -> dict[tuple[int, str], float]:
    """Mean held-out accuracy over random splits with k photos a class (classes with more than k photos);
    ``labelcat auto`` as ``labelcat train`` fits it (with the taxonomy prior, from ``prior_of``) and
    without the prior."""
    rng = np.random.default_rng(seed)
    out: dict[tuple[int, str], list[float]] = {}
    for k in ks:
        classes = [c for c in np.unique(y) if (y == c).sum() > k]
        prior = prior_of(classes) if prior_of is not None else None  # the same classes every split
        for _ in range(splits):
            train, test = draw_split(rng, y, classes, k)
            yk = np.searchsorted(classes, y)
            mean = emb[train].mean(axis=0)
            zt, zs = normalise(emb[train], mean), normalise(emb[test], mean)
            raw_t = emb[train] / np.linalg.norm(emb[train], axis=1, keepdims=True)
            raw_s = emb[test] / np.linalg.norm(emb[test], axis=1, keepdims=True)
            rules = {"raw cosine centroid": centroid_rule(raw_t, yk[train], len(classes))[0],
                     "CL2N centroid": centroid_rule(zt, yk[train], len(classes))[0]}
            for name, w in rules.items():
                zz = raw_s if name.startswith("raw") else zs
                out.setdefault((k, name), []).append(float(((zz @ w).argmax(axis=1) == yk[test]).mean()))
            # the nearest training photo (1-NN) on the few-shot head's features, for the comparison
            f = fit(emb[train], yk[train], np.arange(len(train)), len(classes), "auto")
            zp_t, zp_s = f.embed(emb[train]), f.embed(emb[test])
            out.setdefault((k, "nearest training photo (1-NN)"), []).append(
                float((yk[train][(zp_s @ zp_t.T).argmax(axis=1)] == yk[test]).mean()))
            pred = (zp_s @ f.weights + f.bias).argmax(axis=1)
            out.setdefault((k, "labelcat auto without the taxonomy prior"), []).append(float((pred == yk[test]).mean()))
            if prior is not None:
                fp = shop_fit(emb, yk, train, len(classes), prior)
                pred = shop_logits(fp, fp.embed(emb[test]), prior, test).argmax(axis=1)
            out.setdefault((k, "labelcat auto (centroid/logreg by CV, taxonomy prior weighted by CV)"), []).append(
                float((pred == yk[test]).mean()))
    return {key: float(np.mean(v)) for key, v in out.items()}


def few_shot_calibration(emb: np.ndarray, y: np.ndarray, ks: list[int], splits: int, seed: int = 0,
                         draws: int = 20, prior_of: PriorOf | None = None) -> dict[int, dict[str, float]]:
    """Held-out calibration of the few-shot model as ``labelcat train`` fits it (temperature from the
    out-of-fold scores, ``recipe.calibrate``), per k photos a class: accuracy, mean confidence, ECE per split
    (averaged), the per-split ECE a perfectly calibrated model with the same confidences would show
    (labels drawn right with probability = confidence, ``draws`` times), and ECE over every split's photos
    pooled.

    Why the floor: fifteen bins over the 50-80 held-out photos of one split are mostly empty or hold a few
    photos each, so the per-split ECE is large even for a model whose confidences are exactly right; the
    pooled figure is what "said 0.9, right 90% of the time" means across shops."""
    rng, draw = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    out: dict[int, dict[str, float]] = {}
    for k in ks:
        classes = [c for c in np.unique(y) if (y == c).sum() > k]
        prior = prior_of(classes) if prior_of is not None else None  # the same classes every split
        yk = np.searchsorted(classes, y)
        per, floor, probs, labels = [], [], [], []
        for _ in range(splits):
            train, test = draw_split(rng, y, classes, k)
            f = shop_fit(emb, yk, train, len(classes), prior)
            p = softmax(shop_logits(f, f.embed(emb[test]), prior, test), card_temperature(f, yk[train], len(classes)))
            per.append(ece(p, yk[test]))
            conf, top = p.max(axis=1), p.argmax(axis=1)
            floor.append(np.mean([ece(p, np.where(draw.random(len(conf)) < conf, top, (top + 1) % len(classes)))
                                  for _ in range(draws)]))
            probs.append(p)
            labels.append(yk[test])
        pooled_p, pooled_y = np.concatenate(probs), np.concatenate(labels)
        out[k] = {"accuracy": float((pooled_p.argmax(axis=1) == pooled_y).mean()),
                  "confidence": float(pooled_p.max(axis=1).mean()), "per_split": float(np.mean(per)),
                  "floor": float(np.mean(floor)), "pooled": ece(pooled_p, pooled_y),
                  "test_photos": float(np.mean([len(v) for v in labels]))}
    return out


def junk_rates(emb: np.ndarray, y: np.ndarray, junk_emb: np.ndarray, k: int, splits: int, seed: int = 1,
               prior_of: PriorOf | None = None, junk_rows: np.ndarray | None = None) -> tuple[float, float]:
    """(junk recall, products lost) of a few-shot model's own evidence, with each non-product filed in a random
    folder and each held-out product in its own: the rule ``open_set_reason`` applies at night. ``prior_of``:
    as in ``few_shot_curve``, its rows ``junk_rows`` for ``junk_emb``."""
    rng = np.random.default_rng(seed)
    caught, lost, n_junk, n_prod = 0, 0, 0, 0
    classes = [c for c in np.unique(y) if (y == c).sum() > k]
    prior = prior_of(classes) if prior_of is not None else None  # the same classes every split
    for _ in range(splits):
        train, test = draw_split(rng, y, classes, k)
        yk = np.searchsorted(classes, y)
        f = shop_fit(emb, yk, train, len(classes), prior)
        threshold = f.min_similarity if f.min_similarity is not None else -1.0

        def junked(e: np.ndarray, hint: int, row: int) -> bool:
            z = f.embed(e[None, :])[0]
            sims = f.centroids @ z
            label = int(shop_logits(f, z[None, :], prior, [row])[0].argmax())
            return bool(sims.max() < threshold or (label != hint and sims[hint] < OUTLIER_SIMILARITY))

        lost += sum(junked(emb[i], int(yk[i]), i) for i in test)
        n_prod += len(test)
        rows = junk_rows if junk_rows is not None else np.zeros(len(junk_emb), int)
        caught += sum(junked(e, int(rng.integers(len(classes))), int(r)) for e, r in zip(junk_emb, rows))
        n_junk += len(junk_emb)
    return caught / n_junk, lost / n_prod


def file_in_folders(rng: np.random.Generator, own: Sequence[int], kinds: Sequence[str], folders: Sequence[int],
                    others: Sequence[str], misfiled: float, share: float) -> list[tuple[int, int, str]]:
    """One random night's folder tree: (photo, folder, tally) for each product ``p`` (in its own folder
    ``own[p]``, or with probability ``misfiled`` in another of ``folders``; tallied as ``kinds[p]`` misfiled or
    in their own folder) and for a random ``share`` of the non-products (photo ``len(own) + j``, tallied as
    ``others[j]``), each in a random folder."""
    placed = []
    for p, (folder, kind) in enumerate(zip(own, kinds)):
        if rng.random() < misfiled:
            placed.append((p, int(rng.choice([c for c in folders if c != folder])), f"{kind} misfiled"))
        else:
            placed.append((p, int(folder), f"{kind} in their own folder"))
    for j in rng.choice(len(others), round(share * len(others)), replace=False):
        placed.append((len(own) + int(j), int(rng.choice(folders)), others[j]))
    return placed


def _count(tallies: dict[str, list[int]], name: str, junked: bool) -> None:
    counts = tallies.setdefault(name, [0, 0])
    counts[0] += junked
    counts[1] += 1


def folder_trees(preds, clf, hinted: np.ndarray, kinds: list[str], shop: list[int], cfg: JunkConfig, runs: int,
                 misfiled: float = 0.15, share: float = 0.5, seed: int = 2,
                 sold: np.ndarray | None = None) -> dict[str, tuple[int, int]]:
    """Junk decisions as ``labelcat run`` makes them on a folder per category, all photos in one chunk.

    Each run files the photos (``file_in_folders``: every product in its own category's folder, except a random
    ``misfiled`` share put in another category's folder, and a random ``share`` of the non-products in random
    folders); then the runner's rules decide (a folder most of whose photos the model confidently places
    elsewhere is no hint: ``unfiled_hints``): the photo's own evidence (``photo_reason``), then its folder
    (``folder_verdict``: a photo unlike the others of its folder is junk when the model disagrees with the
    folder too; one as like them as they are like each other overrules a ``hint_mismatch``). ``kinds[i]`` names
    row ``i``'s tally ('dev', 'test' for products, anything else for non-products; ``hinted[i]`` is -1 there).
    ``sold``: the shop's catalogue (``Catalogue.sold``; what ``--catalogue auto`` makes of a tree that files
    photos under every category of ``shop``): the probabilities given it, and ``not_sold``, as the runner.
    Returns {tally: (junked, placed)}."""
    rng = np.random.default_rng(seed)
    cats = clf.categories
    out: dict[str, list[int]] = {}
    photos = np.concatenate([np.flatnonzero(hinted >= 0), np.flatnonzero(hinted < 0)])
    n_products = int((hinted >= 0).sum())
    departments = clf.taxonomy.departments
    for _ in range(runs):
        placed = file_in_folders(rng, hinted[photos[:n_products]], [f"{kinds[i]} products" for i in photos[:n_products]],
                                 shop, [kinds[i] for i in photos[n_products:]], misfiled, share)
        rows = [int(photos[p]) for p, _, _ in placed]
        hints = [cats[f] for _, f, _ in placed]
        unfiled = unfiled_hints(preds.probs[rows], hints, hints, cats, preds.product_mass[rows],
                                preds.group_mass[rows], clf.taxonomy.groups, cfg)
        hints = [None if h in unfiled else h for h in hints]
        likeness = folder_likeness(preds.embeddings[rows], hints, cfg)
        given = sold_posterior(preds.probs[rows], sold, departments, np.array([cats.index(h) if h else -1 for h in hints]))
        for j, (i, hint, (_, _, tally)) in enumerate(zip(rows, hints, placed)):
            label = cats[int(given[j].argmax())]
            reason = photo_reason(given[j], preds.probs[i], sold, cats, float(preds.product_mass[i]), preds.group_mass[i],
                                  clf.taxonomy.groups, hint, cfg, departments)
            _count(out, tally, folder_verdict(reason, likeness.get(j), label, hint, cfg)[0] is not None)
    return {k: (v[0], v[1]) for k, v in sorted(out.items())}


def few_shot_trees(emb: np.ndarray, y: np.ndarray, junk_emb: np.ndarray, k: int, runs: int, cfg: JunkConfig,
                   misfiled: float = 0.15, share: float = 0.5, seed: int = 3,
                   evidence: tuple[np.ndarray, np.ndarray, list[str]] | None = None,
                   prior_of: PriorOf | None = None) -> dict[str, tuple[int, int]]:
    """A shop model trained on ``k`` photos a class, then a night on a folder per class as ``labelcat run
    --model`` decides: the photo's own evidence (``semantic_reason`` on the model's calibrated probabilities,
    then ``open_set_reason``) and the folder's (``folder_verdict``) on the embeddings the model's logits layer
    reads. Tonight's photos are the products it was not trained on and a random ``share`` of ``junk_emb``,
    filed by ``file_in_folders``. ``evidence``: (product mass, not-product group masses, group names) of the
    ImageNet head for the rows of ``emb`` then ``junk_emb``, as a shop model that keeps its backbone's
    ImageNet output reports them; without it, a shop model's photos have no ImageNet evidence (product mass
    1, no groups). ``prior_of``: as in ``few_shot_curve``, over the rows of ``emb`` then ``junk_emb``.
    Returns {tally: (junked, placed)}."""
    rng = np.random.default_rng(seed)
    classes = [c for c in np.unique(y) if (y == c).sum() > k]
    prior = prior_of(classes) if prior_of is not None else None  # the same classes every split
    names = [str(c) for c in range(len(classes))]
    out: dict[str, list[int]] = {}
    for _ in range(runs):
        train, rows = draw_split(rng, y, classes, k)
        yk = np.searchsorted(classes, y)
        f = shop_fit(emb, yk, train, len(classes), prior)
        card = open_set_card(f)
        t = card_temperature(f, yk[train], len(classes))
        placed = file_in_folders(rng, yk[rows], ["held-out products"] * len(rows), list(range(len(classes))),
                                 ["non-products"] * len(junk_emb), misfiled, share)
        photos = np.concatenate([emb[rows], junk_emb])
        source = np.concatenate([rows, len(emb) + np.arange(len(junk_emb))])[[p for p, _, _ in placed]]
        zz = f.embed(photos[[p for p, _, _ in placed]])
        probs = softmax(shop_logits(f, zz, prior, source), t)
        hints = [names[c] for _, c, _ in placed]
        likeness = folder_likeness(zz, hints, cfg)
        for j, (e, hint, (_, _, tally)) in enumerate(zip(zz, hints, placed)):
            top = int(probs[j].argmax())
            label = names[top]
            mass, groups, group_names = ((evidence[0][source[j]], evidence[1][source[j]], evidence[2]) if evidence
                                         else (1.0, np.zeros(0, np.float32), []))
            own = (photo_reason(probs[j], probs[j], None, names, float(mass), groups, group_names, hint, cfg)
                   or open_set_reason(e, card, names, label, hint, cfg))
            reason = folder_verdict(own, likeness.get(j), label, hint, cfg)[0]
            _count(out, tally, reason is not None)
    return {key: (v[0], v[1]) for key, v in sorted(out.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--splits", type=int, default=200)
    ap.add_argument("--wallpapers", action="store_true", help="also score held-out non-products (Debian wallpapers)")
    ap.add_argument("--gcompris", action="store_true",
                    help="add GCompris's tool and kitchen photos to the products and its animal, fish, power plant and "
                         "monument photos to the held-out non-products")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="labelcat-decisions-") as work:
        run(Path(work), args)


def run(work: Path, args: argparse.Namespace) -> None:
    """Fetch the photos into ``work``, classify them once and print every table."""
    photos = saleor_photos(work) + more_shop_photos(work)
    junk = skimage_photos(work)
    held_out_sets: dict[str, list[Path]] = {}
    if args.wallpapers:
        held_out_sets["Debian wallpaper photos"] = wallpaper_photos(work)
    if args.gcompris:
        products, non_products = gcompris_photos(work)
        photos += products
        held_out_sets["GCompris animal, fish, power plant and monument photos"] = non_products
    held_out = [p for paths in held_out_sets.values() for p in paths]
    clf = load_classifier("efficientnet_lite0", precision="float32")
    preds = predict(clf, [p for p, _, _ in photos] + junk + held_out)
    n = len(photos)
    emb, junk_emb = preds.embeddings[:n], preds.embeddings[n:n + len(junk)]
    folders = sorted({f for _, f, _ in photos})
    y = np.array([folders.index(f) for _, f, _ in photos])
    part = np.array([s for _, _, s in photos])
    print(f"{n} product photos ({(part == 'dev').sum()} dev, {(part == 'test').sum()} test), "
          f"{len(folders)} categories; {len(junk)} scikit-image non-products; held out: "
          + (", ".join(f"{len(v)} {k}" for k, v in held_out_sets.items()) or "none"))
    print("\nZero-shot (ImageNet Lite0 + taxonomy): label == the folder's category")
    hinted = np.array([clf.categories.index(clf.hint_category(f)) for _, f, _ in photos])
    cfg = JunkConfig()
    cats = list(clf.categories)
    shop = sorted(set(hinted.tolist()))
    # what `--catalogue auto` makes of a night that files photos under every folder: the shop's categories
    catalogues = {"all": None, "auto": Catalogue(cats, seen={cats[h] for h in shop}).sold()}

    departments = clf.taxonomy.departments
    # the photo alone (no folder: nothing is filed under a department) given each catalogue
    given = {catalogue: sold_posterior(preds.probs, sold) for catalogue, sold in catalogues.items()}

    def junked(i: int, hint: int, catalogue: str) -> bool:
        """The default model's junk rules on photo ``i`` filed under category ``hint``, the runner's way."""
        sold = catalogues[catalogue]
        filed = sold_posterior(preds.probs[i:i + 1], sold, departments, np.array([hint]))[0]
        return photo_reason(filed, preds.probs[i], sold, cats, float(preds.product_mass[i]), preds.group_mass[i],
                            clf.taxonomy.groups, cats[hint], cfg, departments) is not None

    for catalogue, sold in catalogues.items():
        probs = given[catalogue][:n]
        filed = sold_posterior(preds.probs[:n], sold, departments, hinted)
        fused = hint_posterior(filed, hinted, cfg.hint_trust, int(sold.sum()) if sold is not None else None)
        print(f" --catalogue {catalogue} ({len(cats) if sold is None else int(sold.sum())} categories)")
        # a night of every photo without folders: each voted on by its most alike others, as the runner labels them
        voted = neighbour_votes(given[catalogue], preds.embeddings)[:n]
        for name in ("dev", "test"):
            idx = np.flatnonzero(part == name)
            alone = sum(int(probs[i].argmax()) == hinted[i] for i in idx)
            votes = sum(int(voted[i].argmax()) == hinted[i] for i in idx)
            lost = [i for i in idx if junked(i, hinted[i], catalogue)]
            kept = sum(int(fused[i].argmax()) == hinted[i] for i in idx if i not in lost)
            print(f"  {name}: the photo alone {alone}/{len(idx)} = {alone / len(idx):.1%}, with its {NEIGHBOURS} most alike "
                  f"photos voting {votes}/{len(idx)} = {votes / len(idx):.1%}; with its folder as the hint "
                  f"(trust {cfg.hint_trust}) labelled right {kept}/{len(idx)} = {kept / len(idx):.1%}, junked {len(lost)}")
    print("\nJunk from the default model's rules (not a product, no product, a contradicted hint, not sold)")
    for catalogue in catalogues:
        for name in ("dev", "test"):
            idx = np.flatnonzero(part == name)
            misfiled = [(i, h) for i in idx for h in shop if h != hinted[i]]
            caught = sum(junked(i, h, catalogue) for i, h in misfiled)
            print(f"  --catalogue {catalogue}, {name}: real products junked in their own folder "
                  f"{sum(junked(i, hinted[i], catalogue) for i in idx)}/{len(idx)}; "
                  f"filed in each other category's folder, junked {caught}/{len(misfiled)} = {caught / len(misfiled):.1%}")
    nonproducts = {"non-products": range(n, n + len(junk))}
    start = n + len(junk)
    for name, paths in held_out_sets.items():
        nonproducts[f"held-out non-products ({len(paths)} {name})"] = range(start, start + len(paths))
        start += len(paths)
    for catalogue in catalogues:
        for label, rows in nonproducts.items():
            if rows:
                caught = sum(junked(i, h, catalogue) for i in rows for h in shop)
                print(f"  --catalogue {catalogue}, {label} filed in each category's folder, junked "
                      f"{caught}/{len(rows) * len(shop)} = {caught / (len(rows) * len(shop)):.1%}")
    kinds = [s for _, _, s in photos] + ["scikit-image non-products"] * len(junk) + [
        f"held-out non-products ({name})" for name, paths in held_out_sets.items() for _ in paths]
    runs = max(10, args.splits // 4)
    print(f"\nAs `labelcat run` decides on a folder per category ({runs} random trees, all photos in one chunk: 15% of "
          f"the products misfiled, half the non-products filed in random folders), junked:")
    for catalogue, sold in catalogues.items():
        trees = folder_trees(preds, clf, np.concatenate([hinted, -np.ones(len(junk) + len(held_out), int)]), kinds,
                             shop, cfg, runs, sold=sold)
        for name, (j, t) in trees.items():
            print(f"  --catalogue {catalogue}, {name}: {j}/{t} = {j / t:.1%}")

    def prior_of(classes: list[int]) -> np.ndarray | None:
        """What ``labelcat train`` adds to a shop model's logits when its classes are these folders."""
        spec = taxonomy_prior([folders[c] for c in classes], clf.taxonomy)
        return None if spec is None else spec.log_prior(preds.probs)

    print(f"\nFew-shot learning curve (mean held-out accuracy over {args.splits} random splits, all {n} photos)")
    curve = few_shot_curve(emb, y, [1, 2, 3, 5], args.splits, prior_of=prior_of)
    for (k, rule), acc in sorted(curve.items()):
        print(f"  k={k}  {rule:40s} {acc:.1%}")
    print(f"  (k=5: only the {sum((y == c).sum() > 5 for c in np.unique(y))} categories with more than 5 photos)")
    print(f"\nFew-shot calibration (temperature fitted on the out-of-fold scores as `labelcat train` does; held-out "
          f"photos, {max(20, args.splits // 2)} random splits)")
    for k, c in few_shot_calibration(emb, y, [3, 5], max(20, args.splits // 2), prior_of=prior_of).items():
        print(f"  k={k}: accuracy {c['accuracy']:.1%}, mean confidence {c['confidence']:.1%}; ECE per split "
              f"{c['per_split']:.3f} (a perfectly calibrated model on {c['test_photos']:.0f} photos: {c['floor']:.3f}), "
              f"ECE over all splits' photos {c['pooled']:.3f}")
    print("\nJunk from the few-shot model's own evidence (non-products filed in random folders)")
    for k in (3, 5):
        recall, lost = junk_rates(emb, y, junk_emb, k, max(20, args.splits // 10), prior_of=prior_of,
                                  junk_rows=np.arange(n, n + len(junk)))
        print(f"  {k} photos a class: junk recall {recall:.1%}, products lost {lost:.1%}  (logit scale {LOGIT_SCALE})")
        for name, rows in list(nonproducts.items())[1:]:
            recall, _ = junk_rates(emb, y, preds.embeddings[rows.start:rows.stop], k, max(20, args.splits // 10),
                                   prior_of=prior_of, junk_rows=np.arange(rows.start, rows.stop))
            print(f"    {name} caught {recall:.1%}")
    print("\nThe same on a folder per class as `labelcat run --model` decides (the model's evidence, then the folder's; "
          "15% of the held-out products misfiled, half the non-products in random folders), junked:")
    evidence = (preds.product_mass, preds.group_mass, clf.taxonomy.groups)
    for k in (3, 5):
        # a model without its backbone's ImageNet head has neither its evidence nor the taxonomy prior
        for kept, label in ((None, "without ImageNet evidence"), (evidence, "with the backbone's ImageNet evidence")):
            for name, (j, t) in few_shot_trees(emb, y, preds.embeddings[n:], k, max(20, args.splits // 10), cfg,
                                               evidence=kept, prior_of=prior_of if kept else None).items():
                print(f"  {k} photos a class, {label}, {name}: {j}/{t} = {j / t:.1%}")


if __name__ == "__main__":
    main()
