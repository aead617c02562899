"""How a registry architecture is fitted: split, optimiser, schedule, callbacks, fit.

Why a module of its own, importing only Keras and numpy: the same recipe must
run on this project's CPU machines (TensorFlow backend) and on a lent GPU
machine that has JAX but no TensorFlow (``KERAS_BACKEND=jax``), so that the
shipped model is trained by exactly the code ``labelcat train`` runs. Data is
fed as numpy arrays, which every Keras backend accepts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.learning.archs import ArchSpec
from pipeline.learning.calibration import ece, fit_temperature, softmax
from pipeline.learning.metrics import classification_metrics, recommend_threshold


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
    force: bool = False  # replace an existing model folder at the destination
    method: str = "auto"  # shop photos: auto | centroid | logreg (few-shot on frozen embeddings) | finetune
    quiet: bool = False
    log: Callable[[str], None] = field(default=print)


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


def callbacks(quiet: bool, schedule_epochs: int = 0) -> list:
    """Best-epoch restore by validation loss. Under a fixed schedule of ``schedule_epochs``
    the schedule owns the learning rate and training never stops early."""
    import keras

    best = keras.callbacks.EarlyStopping(monitor="val_loss", patience=schedule_epochs or 4, restore_best_weights=True,
                                         verbose=0)
    if schedule_epochs:
        return [best]
    return [best, keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.3, patience=2, min_lr=1e-6,
                                                    verbose=0 if quiet else 1)]


def compile_model(model, lr: float, label_smoothing: float = 0.0, weight_decay: float = 0.0,
                  warmup_steps: int = 0, decay_steps: int = 0) -> None:
    """Adam(W) with sparse or smoothed cross-entropy; with ``decay_steps`` a warm-up + cosine schedule."""
    import keras

    rate: Any = lr
    if decay_steps:
        rate = keras.optimizers.schedules.CosineDecay(lr / 10, decay_steps, warmup_target=lr, warmup_steps=warmup_steps)
    optimizer = keras.optimizers.AdamW(rate, weight_decay=weight_decay) if weight_decay else keras.optimizers.Adam(rate)
    if label_smoothing:  # needs one-hot targets (fit_arrays makes them)
        loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=label_smoothing)
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])


def fit_arrays(model, spec: ArchSpec, x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray, y_va: np.ndarray,
               epochs: int, batch: int, lr: float, quiet: bool, continued: bool = False) -> dict[str, Any]:
    """Compile ``model`` with the spec's recipe and fit it on in-memory arrays; returns the phase record."""
    steps = -(-len(y_tr) // batch)
    cosine = spec.schedule == "cosine"
    compile_model(model, lr, spec.label_smoothing, spec.weight_decay,
                  warmup_steps=steps if cosine else 0, decay_steps=steps * max(epochs - 1, 1) if cosine else 0)
    n = int(model.outputs[0].shape[-1])

    def targets(y: np.ndarray) -> np.ndarray:
        return np.eye(n, dtype=np.float32)[y] if spec.label_smoothing else y.astype(np.int32)

    hist = model.fit(x_tr.astype(np.float32), targets(y_tr), validation_data=(x_va.astype(np.float32), targets(y_va)),
                     epochs=epochs, batch_size=batch, shuffle=True,
                     callbacks=callbacks(quiet, epochs if cosine else 0),
                     verbose=0 if quiet else 2)
    return {"phase": "continue" if continued else "train", "epochs_run": len(hist.history["loss"]),
            "learning_rate": lr, "schedule": spec.schedule, "label_smoothing": spec.label_smoothing,
            "weight_decay": spec.weight_decay,
            "best_val_accuracy": float(max(hist.history.get("val_accuracy", [0.0])))}


def logits_of(model, x: np.ndarray, batch: int = 512) -> np.ndarray:
    """Inference logits as numpy, whatever the Keras backend."""
    return np.asarray(model.predict(x.astype(np.float32), batch_size=batch, verbose=0))




MIN_CALIBRATION = 20  # fewer validation photos than this: temperature fitting is noise, keep T=1


def calibrate(val_logits: np.ndarray, y_val: np.ndarray, classes: list[str], target: float) -> dict[str, Any]:
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


def brief(m: dict[str, Any]) -> dict[str, Any]:
    """The metrics a model card keeps (no confusion matrix or reliability bins)."""
    return {k: m[k] for k in ("n", "accuracy", "macro", "weighted", "ece", "per_class", "coverage")}


def machine() -> str:
    """What trained the model: architecture, cores, and the accelerator the Keras backend used."""
    import platform

    import keras

    from pipeline.ops.device import cpu_count

    backend = keras.backend.backend()
    accel = ""
    if backend == "jax":
        import jax

        dev = jax.devices()[0]
        accel = f" + {dev.device_kind}" if dev.platform == "gpu" else ""
    elif backend == "tensorflow":
        from pipeline.ops.device import has_gpu

        accel = " + GPU" if has_gpu() else ""
    return f"{platform.machine()} {cpu_count()} cores{accel} (keras {backend})"
