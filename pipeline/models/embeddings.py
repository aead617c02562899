"""Geometry of photo embeddings shared by training and the night's junk checks.

Why one module: a folder outlier at night (``stages.junk.hint_outliers``) and a
training photo left out as unlike its class (``learning.fewshot``) are the
same judgement, so they must use the same centring, scaling and
leave-one-out similarity.
"""

from __future__ import annotations

import numpy as np


def normalise(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Centre on ``mean`` (the shop's, or tonight's) and scale each row to unit length (CL2N)."""
    z = x - mean
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-8)


def leave_one_out_similarity(x: np.ndarray, groups: np.ndarray, centre: np.ndarray | None = None) -> np.ndarray:
    """Each row's cosine similarity (CL2N, centred on ``centre``, by default all rows' mean) to the mean
    of the *other* rows of its group; nan for a row alone in its group."""
    z = normalise(x, x.mean(axis=0) if centre is None else centre)
    out = np.full(len(groups), np.nan)
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        if len(idx) < 2:
            continue
        total = z[idx].sum(axis=0)
        others = (total[None, :] - z[idx]) / (len(idx) - 1)
        others /= np.maximum(np.linalg.norm(others, axis=1, keepdims=True), 1e-8)
        out[idx] = np.einsum("ij,ij->i", z[idx], others)
    return out
