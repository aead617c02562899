"""Signals the decisions issue asked to measure before anything is built on them: test-time flips,
ImageNet logits beside the pooled features, and tonight's unlabelled photos (transductive class means).

Same photos and splits as ``bench/decisions.py`` (its data functions): the Saleor, shuup and Venia shop
photos in 11 category folders, the scikit-image non-products. One Lite0 pass over the photos and one over
their mirror images (written as PNG, so nothing but the flip differs) give every variant's inputs:

- **zero-shot**: the taxonomy's category from the photo alone, from the mean of the photo's and its
  mirror's probabilities (flip TTA), per part (dev / test);
- **few-shot** (k photos a class, random splits, held-out accuracy) for CL2N centroid and ``auto`` as
  ``labelcat train`` fits them, on: the features; the features averaged with the mirror's; the features
  beside the 1,000 ImageNet logits (each part CL2N, the logits weighted by ``alpha``); and the centroid
  rule with its class means refined on the held-out photos *and* the non-products (soft k-means, as at
  night, where tonight's photos are unlabelled and some are junk);
- the few-shot model's own junk evidence (``open_set_reason``'s rule) for the flip-averaged features.

Usage: ``python bench/decision_signals.py [--splits 200]``; prints the tables in the README's decisions section.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decisions import draw_split, junk_rates, more_shop_photos, saleor_photos, skimage_photos  # noqa: E402

from pipeline.learning.fewshot import LOGIT_SCALE, centroid_rule, fit  # noqa: E402
from pipeline.models.classifier import load_classifier  # noqa: E402
from pipeline.models.embeddings import normalise  # noqa: E402
from pipeline.stages.classify import predict  # noqa: E402


def mirrored(paths: list[Path], workdir: Path) -> list[Path]:
    """Each photo flipped left to right, as a lossless PNG (EXIF orientation applied first, as the decode does)."""
    from PIL import ImageOps

    out = []
    for i, p in enumerate(paths):
        target = workdir / f"mirror-{i:03d}.png"
        with Image.open(p) as im:
            ImageOps.exif_transpose(im).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(target)
        out.append(target)
    return out


def soft_kmeans(support: np.ndarray, y: np.ndarray, n: int, queries: np.ndarray, steps: int, weight: float) -> np.ndarray:
    """Class means refined with unlabelled ``queries`` (Ren et al. 2018, soft k-means): each query joins every
    mean by its softmax responsibility at ``LOGIT_SCALE``, counted as ``weight`` of a labelled photo."""
    c = centroid_rule(support, y, n)[2]
    sums = np.stack([support[y == k].sum(axis=0) for k in range(n)])
    counts = np.bincount(y, minlength=n).astype(float)
    for _ in range(steps):
        logits = LOGIT_SCALE * queries @ c.T
        r = np.exp(logits - logits.max(axis=1, keepdims=True))
        r /= r.sum(axis=1, keepdims=True)
        c = (sums + weight * r.T @ queries) / (counts + weight * r.sum(axis=0))[:, None]
        c /= np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-8)
    return c


def few_shot(features: dict[str, np.ndarray], y: np.ndarray, junk: dict[str, np.ndarray], k: int, splits: int,
             seed: int = 0) -> dict[str, float]:
    """Held-out accuracy of each rule on each feature set, the same random splits for all."""
    rng = np.random.default_rng(seed)
    classes = [c for c in np.unique(y) if (y == c).sum() > k]
    yk = np.searchsorted(classes, y)
    scores: dict[str, list[float]] = {}
    for _ in range(splits):
        train, test = draw_split(rng, y, classes, k)
        for name, x in features.items():
            mean = x[train].mean(axis=0)
            zt, zs = normalise(x[train], mean), normalise(x[test], mean)
            w = centroid_rule(zt, yk[train], len(classes))[0]
            scores.setdefault(f"{name}: CL2N centroid", []).append(float(((zs @ w).argmax(1) == yk[test]).mean()))
            f = fit(x[train], yk[train], np.arange(len(train)), len(classes), "auto")
            pred = (f.embed(x[test]) @ f.weights + f.bias).argmax(1)
            scores.setdefault(f"{name}: auto", []).append(float((pred == yk[test]).mean()))
            if name in junk:  # tonight: the held-out products and every non-product, none labelled
                tonight = np.concatenate([zs, normalise(junk[name], mean)])
                for steps, weight in ((1, 0.5), (2, 0.5), (2, 1.0)):
                    c = soft_kmeans(zt, yk[train], len(classes), tonight, steps, weight)
                    scores.setdefault(f"{name}: centroid refined on tonight's photos ({steps} steps, weight {weight})",
                                      []).append(float(((zs @ c.T).argmax(1) == yk[test]).mean()))
    return {key: float(np.mean(v)) for key, v in scores.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--splits", type=int, default=200)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="labelcat-signals-"))
    photos = saleor_photos(work) + more_shop_photos(work)
    junk = skimage_photos(work)
    paths = [p for p, _, _ in photos] + junk
    clf = load_classifier("efficientnet_lite0", precision="float32")
    plain, flip = predict(clf, paths), predict(clf, mirrored(paths, work))
    head = clf.model.layers[-1]  # the ImageNet logits layer reads the embedding
    w, b = (np.asarray(v) for v in head.get_weights())
    n = len(photos)
    folders = sorted({f for _, f, _ in photos})
    y = np.array([folders.index(f) for _, f, _ in photos])
    part = np.array([s for _, _, s in photos])
    hinted = np.array([clf.categories.index(clf.hint_category(f)) for _, f, _ in photos])
    print(f"{n} product photos, {len(folders)} folders, {len(junk)} non-products; "
          f"mirror images: embeddings at cosine {np.mean(np.sum(normalise(plain.embeddings, 0) * normalise(flip.embeddings, 0), 1)):.3f} "
          f"to the originals on average")

    print("\nZero-shot (taxonomy category from the photo alone == the folder's category)")
    both = (plain.probs + flip.probs) / 2
    for name in ("dev", "test"):
        idx = np.flatnonzero(part == name)
        print(f"  {name}: photo {np.mean(plain.probs[idx].argmax(1) == hinted[idx]):.1%}, "
              f"mirror {np.mean(flip.probs[idx].argmax(1) == hinted[idx]):.1%}, "
              f"both averaged {np.mean(both[idx].argmax(1) == hinted[idx]):.1%}  ({len(idx)} photos)")

    mean_emb = (plain.embeddings + flip.embeddings) / 2
    logits = plain.embeddings @ w + b
    features = {"features": plain.embeddings[:n], "features + mirror": mean_emb[:n]}
    junk_features = {"features": plain.embeddings[n:], "features + mirror": mean_emb[n:]}
    for alpha in (0.5, 1.0):
        cat = np.concatenate([normalise(plain.embeddings, plain.embeddings[:n].mean(0)),
                              alpha * normalise(logits, logits[:n].mean(0))], axis=1)
        features[f"features with ImageNet logits (alpha {alpha})"] = cat[:n]
    print(f"\nFew-shot, mean held-out accuracy over {args.splits} random splits (all {n} photos)")
    for k in (1, 3, 5):
        for rule, acc in few_shot(features, y, junk_features, k, args.splits).items():
            print(f"  k={k}  {rule:78s} {acc:.1%}")
    print("\nFew-shot model's own junk evidence (non-products in random folders caught / held-out products junked)")
    for name, (x, jx) in {"features": (plain.embeddings[:n], plain.embeddings[n:]),
                          "features + mirror": (mean_emb[:n], mean_emb[n:])}.items():
        for k in (3, 5):
            recall, lost = junk_rates(x, y, jx, k, max(20, args.splits // 10))
            print(f"  {name}, k={k}: {recall:.1%} / {lost:.1%}")


if __name__ == "__main__":
    main()
