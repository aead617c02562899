"""Evaluate: how good a model is and how far to trust its confidence.

Why coverage matters most to a shop: accuracy says how often the model is
right overall, but the nightly decision is "above which confidence do we
accept a label without a person?". The coverage table answers it: for each
threshold, the share of photos auto-accepted and how accurate those are;
``recommend_threshold`` picks the lowest threshold that meets a target
precision. Plots are drawn with Pillow (no plotting dependency).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.learning.metrics import THRESHOLDS, classification_metrics, recommend_threshold  # noqa: F401  (re-exported for the CLI)
from pipeline.ops.fsutil import atomic_path

def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow < 10.1
        return ImageFont.load_default()


def plot_confusion(cm: list[list[int]], classes: list[str], path: Path) -> None:
    """Row-normalised confusion matrix heat map with counts."""
    m = np.asarray(cm, dtype=float)
    n = len(classes)
    cell, left, top = 44, 150, 150
    img = Image.new("RGB", (left + n * cell + 20, top + n * cell + 40), "white")
    d = ImageDraw.Draw(img)
    f = _font(12)
    d.text((10, 10), "Confusion matrix (rows: true, columns: predicted)", fill="black", font=_font(14))
    rows = m.sum(axis=1, keepdims=True)
    frac = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    for i in range(n):
        d.text((5, top + i * cell + cell // 3), classes[i][:20], fill="black", font=f)
        label = Image.new("RGBA", (140, 16), (255, 255, 255, 0))
        ImageDraw.Draw(label).text((0, 0), classes[i][:20], fill="black", font=f)
        img.paste(label.rotate(90, expand=True), (left + i * cell + cell // 3, top - 145), label.rotate(90, expand=True))
        for j in range(n):
            v = frac[i, j]
            shade = int(255 - 200 * v)
            color = (shade, shade, 255) if i == j else (255, shade, shade)
            x0, y0 = left + j * cell, top + i * cell
            d.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=color, outline=(220, 220, 220))
            if m[i, j]:
                d.text((x0 + 4, y0 + cell // 3), str(int(m[i, j])), fill="black", font=f)
    with atomic_path(path, suffix=".png") as tmp:
        img.save(tmp, "PNG")


def plot_reliability(bins: list[dict], path: Path, title: str) -> None:
    """Reliability diagram: accuracy per confidence bin against the diagonal."""
    w, h, pad = 520, 520, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    f = _font(12)
    d.text((pad, 15), title, fill="black", font=_font(14))
    x0, y0, x1, y1 = pad, h - pad, w - 20, pad
    d.rectangle([x0, y1, x1, y0], outline="black")
    d.line([x0, y0, x1, y1], fill=(150, 150, 150), width=1)
    for b in bins:
        if not b["count"]:
            continue
        bx0 = x0 + (x1 - x0) * b["lo"]
        bx1 = x0 + (x1 - x0) * b["hi"]
        by = y0 - (y0 - y1) * b["accuracy"]
        d.rectangle([bx0 + 1, by, bx1 - 1, y0], fill=(90, 130, 220), outline=(40, 60, 140))
        cy = y0 - (y0 - y1) * b["confidence"]
        d.line([bx0 + 1, cy, bx1 - 1, cy], fill=(220, 60, 60), width=2)
    for t in (0.0, 0.5, 1.0):
        d.text((x0 + (x1 - x0) * t - 8, y0 + 6), f"{t:.1f}", fill="black", font=f)
        d.text((x0 - 30, y0 - (y0 - y1) * t - 6), f"{t:.1f}", fill="black", font=f)
    d.text((x0 + 120, h - 25), "confidence (red: mean confidence in bin)", fill="black", font=f)
    d.text((pad, 38), "accuracy (blue bars)", fill="black", font=f)
    with atomic_path(path, suffix=".png") as tmp:
        img.save(tmp, "PNG")


def write_report(metrics: dict[str, Any], folder: str | Path, title: str) -> Path:
    """report.md + report.json + confusion.png + reliability.png in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plot_confusion(metrics["confusion"], metrics["classes"], folder / "confusion.png")
    plot_reliability(metrics["reliability"], folder / "reliability.png", f"Reliability, ECE {metrics['ece']:.3f}")
    with atomic_path(folder / "report.json", suffix=".json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    with atomic_path(folder / "report.md", suffix=".md") as tmp:
        tmp.write_text(render_markdown(metrics, title), encoding="utf-8")
    return folder


def render_markdown(m: dict[str, Any], title: str) -> str:
    lines = [f"# {title}", "", f"{m['n']} photos; accuracy **{m['accuracy']:.4f}**; macro F1 {m['macro']['f1']:.4f}; "
             f"weighted F1 {m['weighted']['f1']:.4f}; ECE {m['ece']:.4f}", ""]
    if m.get("catalogue"):
        lines += [f"Catalogue: {', '.join(m['catalogue'])} (labels name only these, as `labelcat run --catalogue` "
                  "gives them)", ""]
    if m.get("photo_alone_accuracy") is not None:
        lines += [f"Each photo voted on by its {m['neighbours']} most alike others, as `labelcat run` labels photos "
                  f"without a folder; the photo alone: accuracy {m['photo_alone_accuracy']:.4f}", ""]
    if "recommended_threshold" in m:
        rt = m["recommended_threshold"]
        lines += [f"Recommended review threshold for precision {m['target_precision']}: "
                  + (f"**{rt}** (`labelcat run` rows below it go to review)" if rt is not None else "none reaches it"), ""]
    lines += ["| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for c, v in m["per_class"].items():
        lines.append(f"| {c} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |")
    for avg in ("macro", "weighted"):
        v = m[avg]
        lines.append(f"| *{avg} avg* | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {m['n']} |")
    lines += ["", "## Coverage", "", "| threshold | auto-accepted | accuracy of accepted |", "|---:|---:|---:|"]
    for r in m["coverage"]:
        acc = f"{r['accuracy']:.4f}" if r["accuracy"] is not None else "—"
        lines.append(f"| {r['threshold']:.2f} | {r['coverage']:.1%} ({r['accepted']}) | {acc} |")
    lines += ["", "![confusion matrix](confusion.png)", "", "![reliability diagram](reliability.png)", ""]
    return "\n".join(lines)


def summary_line(m: dict[str, Any]) -> str:
    return (f"accuracy {m['accuracy']:.4f}, macro F1 {m['macro']['f1']:.4f}, ECE {m['ece']:.4f} on {m['n']} photos")


#: Above this share of photos the model trained on, an evaluation is no test score.
MAX_TEST_OVERLAP = 0.2


def training_overlap(card_path: str | None, sha256: list[str]) -> dict[str, Any] | None:
    """How many of the evaluated photos the model was trained on (by the card's per-photo sha256 list)."""
    if not card_path or not sha256:
        return None
    trained = set(json.loads(Path(card_path).read_text()).get("training_data", {}).get("sha256", []))
    if not trained:
        return None
    shared = sum(s in trained for s in sha256)
    return {"photos": shared, "share": shared / len(sha256), "is_test_score": shared / len(sha256) <= MAX_TEST_OVERLAP}


def evaluate_model(model_ref: str, data: str, target_precision: float = 0.95, batch_size: int = 64,
                   quiet: bool = True, catalogue: str = "auto") -> dict[str, Any]:
    """Metrics of a model (registered name or folder) on ``fashion-mnist`` (its test set) or labelled photos.

    ``catalogue``: as ``labelcat run --catalogue`` (``junk.catalogue_for``); ``auto`` reads the default
    model's probabilities among the categories the photos are labelled with, as a run does among the
    categories its photos are filed under, so the report scores the labels a run would give. The default
    model's photos are then voted on by their most alike others (``embeddings.neighbour_votes``), as a run
    labels a night of photos without folders; ``photo_alone_accuracy`` is the score before the votes.
    """
    from pipeline.models.classifier import load_classifier
    from pipeline.stages.classify import make_step, predict
    from pipeline.models.embeddings import NEIGHBOURS, neighbour_votes
    from pipeline.stages.junk import catalogue_for, sold_posterior

    clf = load_classifier(model_ref, precision="float32")
    shop = catalogue_for(clf, catalogue)
    skipped: list[tuple[str, str]] = []
    if data == "fashion-mnist":
        from pipeline.learning import fashion_mnist as fm

        if [c.lower() for c in clf.categories] != [c.lower() for c in fm.CLASSES]:
            raise ValueError(f"model {model_ref!r} does not predict the Fashion-MNIST classes")
        x, y = fm.load("test")
        if clf.preprocess.shape != (28, 28, 1):
            raise ValueError(f"model {model_ref!r} takes {clf.preprocess.shape} pixels, not 28x28 greyscale")
        step = make_step(clf)
        probs = np.concatenate([np.asarray(step(x[i:i + batch_size, ..., None])[0]) for i in range(0, len(x), batch_size)])
        y = y.astype(int)
    else:
        from pipeline.learning.train import collect

        photos = collect(data, quiet=quiet)
        skipped = list(photos.skipped)
        keep, y_list = [], []
        for i, label in enumerate(photos.labels):
            cls = clf.hint_category(label)
            if cls is None:
                skipped.append((str(photos.paths[i]), f"label {label!r} is not one of the model's classes"))
            else:
                keep.append(photos.paths[i])
                y_list.append(clf.categories.index(cls))
        preds = predict(clf, keep, batch_size=batch_size)
        ok = [i for i, e in enumerate(preds.errors) if e is None]
        probs, embeddings, y = preds.probs[ok], preds.embeddings[ok], np.array(y_list, dtype=int)[ok]
        for c in sorted(set(y.tolist())):
            shop.add(clf.categories[c])
        overlap = training_overlap(clf.info.get("card"), photos.sha256)
    sold = shop.sold()
    given = sold_posterior(probs, sold)
    alone = None
    if data != "fashion-mnist" and clf.taxonomy is not None and len(y):  # as a run labels them without folders
        alone = float((given.argmax(axis=1) == y).mean())
        given = neighbour_votes(given, embeddings)
    metrics = classification_metrics(y, given, clf.categories)
    metrics["catalogue"] = None if sold is None else [c for c, s in zip(clf.categories, sold) if s]
    metrics["neighbours"] = NEIGHBOURS if alone is not None else 0
    metrics["photo_alone_accuracy"] = alone
    if data != "fashion-mnist":
        metrics["training_overlap"] = overlap
    metrics.update(model=str(model_ref), model_version=clf.version, data=str(data), skipped=skipped,
                   target_precision=target_precision,
                   recommended_threshold=recommend_threshold(metrics["coverage"], target_precision))
    return metrics
