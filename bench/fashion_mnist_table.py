"""Train and evaluate every Fashion-MNIST architecture through the CLI; print the README table.

Each row is produced by ``labelcat train fashion-mnist --arch NAME`` followed by
``labelcat evaluate MODEL fashion-mnist`` (the official 10k test set, never
seen in training or validation). Usage:
``python bench/fashion_mnist_table.py [--out bench/out/fmnist] [ARCH ...]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.learning.archs import ARCHS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("archs", nargs="*", default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "fmnist")
    args = ap.parse_args()
    names = args.archs or ARCHS.list()
    rows = []
    for name in names:
        model_dir = args.out / name
        if not (model_dir / "card.json").exists():
            subprocess.run(["labelcat", "train", "fashion-mnist", "--arch", name, "--out", str(model_dir), "--quiet"], check=True)
        report = model_dir / "report"
        subprocess.run(["labelcat", "evaluate", str(model_dir), "fashion-mnist", "--report", str(report), "--quiet"], check=True)
        m = json.loads((report / "report.json").read_text())
        card = json.loads((model_dir / "card.json").read_text())
        t = card["training"]
        rows.append((name, m["accuracy"], m["macro"]["f1"], card["ece_before"], card["ece_after"], m["ece"], t["parameters"],
                     t["seconds"], sum(p["epochs_run"] for p in t["phases"]), t["machine"], t.get("study_accuracy")))
        print(f"{name}: {m['accuracy']:.4f}", flush=True)
    lines = ["| architecture | test accuracy | macro F1 | ECE (validation: raw → calibrated; test) | parameters | training time | epochs | machine | study reported |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for name, acc, f1, e0, e1, et, params, secs, epochs, mach, study in rows:
        lines.append(f"| `{name}` | {acc:.2%} | {f1:.4f} | {e0:.3f} → {e1:.3f}; {et:.3f} | {params:,} | {secs / 60:.1f} min | {epochs} | {mach} | "
                     + (f"{study}%" if study else "—") + " |")
    table = "\n".join(lines)
    (args.out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
