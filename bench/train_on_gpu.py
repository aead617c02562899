"""Train Fashion-MNIST architectures on a GPU machine that has JAX but no TensorFlow.

Why: the shipped model needs more epochs than 2 CPU cores give. The recipe is
``pipeline.learning.fashion_mnist.train_fashion_mnist`` itself, run under
``KERAS_BACKEND=jax``; the saved ``model.keras`` and card load under
TensorFlow for ``labelcat run`` and ``labelcat evaluate``. Usage (data from
Debian's dataset-fashion-mnist, copied next to the checkout)::

    KERAS_BACKEND=jax LABELCAT_FASHION_MNIST_DIR=.fmnist python bench/train_on_gpu.py OUT fmnist_wrn [ARCH ...]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.learning.fashion_mnist import train_fashion_mnist  # noqa: E402
from pipeline.learning.recipe import TrainConfig  # noqa: E402


def main() -> None:
    out, archs = Path(sys.argv[1]), sys.argv[2:]
    epochs = int(os.environ.get("EPOCHS", "0")) or None  # override the recipe's epochs (timing a short run)
    for arch in archs:
        train_fashion_mnist(arch, out / arch, TrainConfig(epochs=epochs, quiet=False, log=lambda m: print(m, flush=True)))


if __name__ == "__main__":
    main()
