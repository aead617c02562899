"""Near duplicates at scale: thousands of real-photo composites with planted copies, through labelcat's dedupe.

The issue's scale test, rebuilt from what this project may use: ``bench.make_photos`` composites (2x2 mosaics
of random crops of the Saleor product photos and scikit-image's photos, hue-turned at random, so distinct
composites often share similar quarters), and for a tenth of them one copy of each kind the issue planted
(JPEG q40, half size, 4% a side cropped, a text watermark). The same files go through labelcat's scan and
``find_duplicates`` (before the model), then the default model on the photos kept and ``find_copies`` (the
copy check after the model), as the runners do. A copy is found when pairs inside its own group link it to
its composite; a cross-group pair joins two composites.

Usage: ``python bench/dedupe_composites.py [--n 5000] [--size 800x600]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "sample_catalog"))

from bench import make_photos  # noqa: E402
from near_duplicates import MAX_BYTES, MAX_PIXELS, _crop, _watermark, score  # noqa: E402

from pipeline.models.classifier import load_classifier  # noqa: E402
from pipeline.stages.classify import predict  # noqa: E402
from pipeline.stages.copies import EmbeddingIndex, classified_photos, find_copies  # noqa: E402
from pipeline.stages.dedupe import find_duplicates  # noqa: E402
from pipeline.stages.ingest import ingest  # noqa: E402
from pipeline.stages.scan import candidate, scan_records  # noqa: E402

KINDS = {
    "jpeg q40": (lambda im: im, {"quality": 40}),
    "half size": (lambda im: im.resize((im.width // 2, im.height // 2), Image.LANCZOS), {"quality": 90}),
    "crop 4%/side": (lambda im: _crop(im, 0.04), {"quality": 90}),
    "text watermark": (_watermark, {"quality": 90}),
}


def plant(folder: Path, originals: list[Path], rng: np.random.Generator) -> dict[str, tuple[str, str]]:
    """Copies of a tenth of ``originals``, one of each kind; file name -> (group, kind) for every file."""
    truth = {p.name: (p.stem, "original") for p in originals}
    for p in rng.choice(originals, len(originals) // 10, replace=False):
        img = Image.open(p).convert("RGB")
        for k, (kind, (make, opts)) in enumerate(KINDS.items()):
            name = f"{p.stem}_copy{k}.jpg"
            make(img).save(folder / name, "JPEG", **opts)
            truth[name] = (p.stem, kind)
    return truth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--size", default="800x600")
    args = ap.parse_args()
    size = tuple(int(x) for x in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        t = time.perf_counter()
        truth = plant(folder, make_photos(folder, args.n, size), np.random.default_rng(1))
        print(f"{args.n:,} composites {args.size}, {len(truth) - args.n:,} planted copies, made in "
              f"{time.perf_counter() - t:.0f} s", file=sys.stderr)
        records = list(ingest(folder).records)
        t = time.perf_counter()
        scans = scan_records(records, MAX_PIXELS, MAX_BYTES, quiet=True)
        scan_s = time.perf_counter() - t
        name = {r.row: r.resolved.name for r in records}
        t = time.perf_counter()
        matches = find_duplicates([candidate(row, s) for row, s in scans.items()])
        dedupe_s = time.perf_counter() - t
        hashed = {frozenset((name[m.row], name[m.kept])) for m in matches.values()}
        kept = [row for row in scans if row not in matches]
        clf = load_classifier("efficientnet_lite0")
        path = {r.row: r.resolved for r in records}
        t = time.perf_counter()
        preds = predict(clf, [path[row] for row in kept])
        classify_s = time.perf_counter() - t
        photos = classified_photos(kept, [scans[row].width * scans[row].height for row in kept],
                                   [scans[row].hashes.thumb for row in kept], preds.probs, preds.embeddings, clf.categories,
                                   [scans[row].fidelity for row in kept])
        t = time.perf_counter()
        copies = find_copies(photos, EmbeddingIndex())
        copies_s = time.perf_counter() - t
        both = hashed | {frozenset((name[m.row], name[m.kept])) for m in copies.values()}
    results = {"before the model": score(hashed, truth, KINDS), "with the copy check": score(both, truth, KINDS)}
    print(f"\n{args.n:,} composites ({args.size}), a tenth with one planted copy of each kind\n")
    print("| copy kind | " + " | ".join(f"labelcat {k}" for k in results) + " |")
    print("|---|" + "---:|" * len(results))
    for kind in KINDS:
        print(f"| {kind} | " + " | ".join(f"{r[0][kind][0]}/{r[0][kind][1]}" for r in results.values()) + " |")
    total = {k: (sum(f for f, _ in r[0].values()), sum(n for _, n in r[0].values())) for k, r in results.items()}
    print("| **all** | " + " | ".join(f"**{f}/{n} ({f / n:.1%})**" for f, n in total.values()) + " |")
    print("| cross-group pairs | " + " | ".join(str(r[1]) for r in results.values()) + " |")
    print(f"\nscan {scan_s:.1f} s, dedupe {dedupe_s:.1f} s, classify {len(kept):,} kept photos {classify_s:.1f} s, "
          f"copy check {copies_s:.1f} s ({len(records):,} files)")


if __name__ == "__main__":
    main()
