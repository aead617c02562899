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


#: how many of tonight's most alike photos vote on a photo's label, and their votes' share against its own
NEIGHBOURS = 5
NEIGHBOUR_WEIGHT = 0.5


def neighbour_votes(probs: np.ndarray, embeddings: np.ndarray, k: int = NEIGHBOURS, weight: float = NEIGHBOUR_WEIGHT,
                    iterations: int = 10, block: int = 1024) -> np.ndarray:
    """Each row's category probabilities once the ``k`` most alike other rows (CL2N cosine, centred on these
    rows' mean) have voted: ``(1 - weight) * own + weight * the neighbours' (weighted by their positive
    similarity)``, iterated so votes spread along chains of alike photos (label propagation).

    Why: a night's photos come in kinds (a SKU shot from three sides, a line of dresses worn by models), and
    ImageNet's mistakes are a photo's own: a dress it calls a jersey sits among dresses it calls dresses.
    Used for photos with no folder or hint, whose label is otherwise the photo's alone. A row with no
    positively alike neighbour keeps its own probabilities; rows of zeros (failed decodes) neither vote
    nor change. Fewer than ``k + 1`` usable rows: returned unchanged (too few to say what is alike).
    """
    ok = probs.sum(axis=1) > 0
    if ok.sum() <= k or embeddings.ndim != 2 or embeddings.shape[1] == 0:
        return probs
    idx = np.flatnonzero(ok)
    x = embeddings[idx].astype(np.float32)  # a ranking of neighbours: float32 is plenty, at half the cost
    z = normalise(x, x.mean(axis=0))
    near = np.empty((len(idx), k), int)
    sims = np.empty((len(idx), k))
    for start in range(0, len(idx), block):
        s = z[start:start + block] @ z.T
        s[np.arange(len(s)), np.arange(start, start + len(s))] = -np.inf
        top = np.argpartition(-s, k, axis=1)[:, :k]
        near[start:start + block], sims[start:start + block] = top, np.take_along_axis(s, top, axis=1)
    w = np.clip(sims, 0.0, None)
    total = w.sum(axis=1, keepdims=True)
    own = probs[idx].astype(np.float64)
    q = own
    for _ in range(iterations):
        votes = np.divide((w[..., None] * q[near]).sum(axis=1), total, out=own.copy(), where=total > 0)
        q = np.where(total > 0, (1 - weight) * own + weight * votes, own)
    out = probs.copy()
    out[idx] = q.astype(probs.dtype)
    return out
