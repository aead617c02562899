"""Classification metrics and the auto-accept threshold, on numpy arrays only.

Why apart from ``evaluate``: training (on any Keras backend, GPU machines
included) scores its validation and test splits with the same numbers the
``evaluate`` command reports, without importing the report's plotting or the
inference stack.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.learning.calibration import ece, reliability

THRESHOLDS = [0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.98, 0.99]


def classification_metrics(y: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1/support, averages, ECE, confusion, coverage."""
    y = np.asarray(y, dtype=int)
    n_cls = len(classes)
    pred = probs.argmax(axis=1) if len(y) else np.zeros(0, int)
    conf = probs.max(axis=1) if len(y) else np.zeros(0)
    cm = np.zeros((n_cls, n_cls), dtype=int)
    np.add.at(cm, (y, pred), 1)
    per_class = {}
    for i, name in enumerate(classes):
        tp = cm[i, i]
        p = tp / cm[:, i].sum() if cm[:, i].sum() else 0.0
        r = tp / cm[i].sum() if cm[i].sum() else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        per_class[name] = {"precision": float(p), "recall": float(r), "f1": float(f1), "support": int(cm[i].sum())}
    support = np.array([per_class[c]["support"] for c in classes], dtype=float)
    present = support > 0

    def avg(key: str, weighted: bool) -> float:
        vals = np.array([per_class[c][key] for c in classes])
        if weighted:
            return float((vals * support).sum() / support.sum()) if support.sum() else 0.0
        return float(vals[present].mean()) if present.any() else 0.0

    coverage = []
    for t in THRESHOLDS:
        accepted = conf >= t
        coverage.append({
            "threshold": t,
            "coverage": float(accepted.mean()) if len(y) else 0.0,
            "accuracy": float((pred[accepted] == y[accepted]).mean()) if accepted.any() else None,
            "accepted": int(accepted.sum()),
        })
    return {
        "n": int(len(y)),
        "accuracy": float((pred == y).mean()) if len(y) else 0.0,
        "macro": {k: avg(k, False) for k in ("precision", "recall", "f1")},
        "weighted": {k: avg(k, True) for k in ("precision", "recall", "f1")},
        "per_class": per_class,
        "ece": ece(probs, y) if len(y) else 0.0,
        "confusion": cm.tolist(),
        "reliability": reliability(probs, y) if len(y) else [],
        "coverage": coverage,
        "classes": list(classes),
    }


def recommend_threshold(coverage: list[dict], target_precision: float) -> float | None:
    """Lowest confidence threshold whose auto-accepted rows reach ``target_precision``."""
    for row in coverage:
        if row["accuracy"] is not None and row["accuracy"] >= target_precision:
            return row["threshold"]
    return None
