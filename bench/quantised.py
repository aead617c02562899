"""The classify step quantised to 8-bit weights (dynamic-range activations) against the float32 step it comes from.

Why a bench and not an option: the issue asks for the model's CPU speed to be tried every way and what
wins kept; quantisation is the obvious next try after XNNPACK, but it moves the outputs every junk and
review threshold was set on. This measures both sides on the same warm process: photos/s of each step on
the engine runs use (XNNPACK, batches of ``--batch-size``, alternated twice), and on real photos (the
``sample_catalog/`` images and ``--photos`` of the speed bench's photo-content mosaics) how often the
taxonomy category and ImageNet's top class change, the largest category probability moved, and the lowest
cosine between the two steps' embeddings.

Usage: ``python bench/quantised.py [--photos 200] [--batch-size 32] [--batches 12]``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "sample_catalog"))

from bench import make_photos, step_rate  # noqa: E402
from pipeline.models.classifier import load_classifier  # noqa: E402
from pipeline.models.lite import LiteStep  # noqa: E402
from pipeline.ops.device import cpu_count  # noqa: E402
from pipeline.stages import decode as dec  # noqa: E402
from pipeline.stages.classify import _raw_outputs, _step_outputs, _tf_step, make_step  # noqa: E402


def quantised_step(classifier) -> LiteStep:
    """The classifier's traced step converted with ``Optimize.DEFAULT`` (8-bit weights, dynamic-range
    activations), on the same engine as the float32 one."""
    import tensorflow as tf

    tf_step = _tf_step(classifier, False)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([tf_step.get_concrete_function()], tf_step)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    return LiteStep(converter.convert(), cpu_count(), _raw_outputs(classifier), _step_outputs(classifier))


def outputs(step, pixels: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    parts = [step(pixels[i:i + batch_size])[:2] for i in range(0, len(pixels), batch_size)]
    return np.concatenate([p for p, _ in parts]), np.concatenate([e for _, e in parts])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=200, help="photo-content mosaics besides sample_catalog's images")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=12)
    args = ap.parse_args()

    classifier = load_classifier("efficientnet_lite0", precision="float32")
    float_step, int8_step = make_step(classifier), quantised_step(classifier)
    x = np.random.default_rng(1).integers(0, 255, (args.batch_size, *classifier.preprocess.shape), dtype=np.uint8)
    rates: dict[str, list[float]] = {"float32": [], "dynamic-range int8": []}
    for _ in range(2):
        rates["float32"].append(step_rate(float_step, x, args.batches))
        rates["dynamic-range int8"].append(step_rate(int8_step, x, args.batches))

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        paths = sorted((ROOT / "sample_catalog" / "images").rglob("*.jpg"))
        paths += make_photos(folder, args.photos) if args.photos else []
        pixels = []
        for p in paths:
            try:
                pixels.append(dec.load_for_model(p))
            except dec.DecodeError:  # the catalogue's planted broken files
                continue
    stack = np.stack(pixels)
    (pf, ef), (pq, eq) = outputs(float_step, stack, args.batch_size), outputs(int8_step, stack, args.batch_size)
    cf, cq = classifier.taxonomy.aggregate(pf)[0], classifier.taxonomy.aggregate(pq)[0]
    cosine = np.sum(ef * eq, axis=1) / (np.linalg.norm(ef, axis=1) * np.linalg.norm(eq, axis=1))
    print(f"model only, {args.batch_size} a batch on XNNPACK ({cpu_count()} threads), two alternated runs each:")
    for name, values in rates.items():
        print(f"  {name}: {', '.join(f'{v:.1f}' for v in values)} photos/s")
    print(f"{len(stack)} real photos: category changed {(cf.argmax(1) != cq.argmax(1)).mean():.1%}, ImageNet top class "
          f"changed {(pf.argmax(1) != pq.argmax(1)).mean():.1%}, largest category probability moved "
          f"{np.abs(cf - cq).max():.3f}, lowest embedding cosine {cosine.min():.4f}")


if __name__ == "__main__":
    main()
