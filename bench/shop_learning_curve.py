"""How accurate is a shop model trained on few photos per class? A learning curve through the CLI.

Product photos with many labelled examples per class are not available offline, so the curve uses
Fashion-MNIST's product images written as photo files: inverted back to a dark product on white and
upscaled to 112 px. For each N, N photos per class go into class folders, ``labelcat train`` fits the
shop transfer model (default settings), and ``labelcat evaluate`` scores it on 100 held-out test photos
per class. Usage: ``python bench/shop_learning_curve.py [--sizes 5 10 20 50] [--out bench/out/curve]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.learning import fashion_mnist as fm  # noqa: E402


def write_photos(images: np.ndarray, labels: np.ndarray, folder: Path) -> None:
    for i, (img, y) in enumerate(zip(images, labels)):
        d = folder / fm.CLASSES[int(y)].replace("/", "-")
        d.mkdir(parents=True, exist_ok=True)
        photo = ImageOps.invert(Image.fromarray(img)).resize((112, 112), Image.BICUBIC).convert("RGB")
        photo.save(d / f"{i:05d}.png")


def pick(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(10)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[5, 10, 20, 50])
    ap.add_argument("--method", default="finetune", choices=["auto", "centroid", "logreg", "finetune"],
                    help="labelcat train --method (the README table is finetune)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "curve")
    args = ap.parse_args()
    x_tr, y_tr = fm.load("train")
    x_te, y_te = fm.load("test")
    test_dir = args.out / "test"
    if not test_dir.exists():
        idx = pick(y_te, 100, seed=1)
        write_photos(x_te[idx], y_te[idx], test_dir)
    rows = []
    for n in args.sizes:
        data = args.out / f"train_{n}"
        if not data.exists():
            idx = pick(y_tr, n, seed=n)
            write_photos(x_tr[idx], y_tr[idx], data)
        model = args.out / f"model_{n}"
        t = time.perf_counter()
        subprocess.run(["labelcat", "train", str(data), "--out", str(model), "--method", args.method, "--quiet", "--force"],
                       check=True)
        secs = time.perf_counter() - t
        report = args.out / f"report_{n}"
        subprocess.run(["labelcat", "evaluate", str(model), str(test_dir), "--report", str(report), "--quiet"], check=True)
        m = json.loads((report / "report.json").read_text())
        cov = {c["threshold"]: c for c in m["coverage"]}
        rows.append((n, m["accuracy"], m["macro"]["f1"], m["ece"], cov[0.9]["coverage"], cov[0.9]["accuracy"], secs))
        print(f"{n} per class: accuracy {m['accuracy']:.3f}", flush=True)
    lines = ["| photos per class | test accuracy | macro F1 | ECE | auto-accepted at 0.9 | accuracy of those | training time |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for n, acc, f1, e, cov, cacc, secs in rows:
        lines.append(f"| {n} | {acc:.1%} | {f1:.3f} | {e:.3f} | {cov:.0%} | "
                     + (f"{cacc:.1%}" if cacc is not None else "—") + f" | {secs / 60:.1f} min |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
