"""Few-shot shop models: a classifier on frozen ImageNet embeddings, chosen by cross-validation.

Why not fine-tuning by default: with 5 photos a category, fine-tuning throws
away what the backbone already knows (measured in the issue: 69% vs 83% for a
plain nearest-centroid rule on the same splits). Here the backbone stays
frozen; its pooled features go through a square root (``power_transform``),
are centred on the shop's own mean and scaled to unit length ("CL2N", as in
SimpleShot), and a linear rule is fitted on them:

- ``centroid``: each class is the mean of its photos; a photo goes to the
  nearest (cosine) mean. Closed form, needs no tuning.
- ``logreg``: L2-regularised softmax regression on the same features.

Both are a ``Dense`` layer over the normalised features, so the saved model
is a plain Keras model (frozen backbone → ``PowerTransform`` → ``Normalization``
→ ``UnitNormalization`` → ``Dense``) that ``run``, ``evaluate`` and ``safe_mode``
loading treat like any other. The method is picked by stratified, group-aware
cross-validation on the training photos (on a tie, ``logreg``: with a few
photos a class the folds often tie, and the regression was ahead at every
size on the README's benchmark), and the same out-of-fold scores fit the temperature and the
open-set threshold (``min_similarity``): a photo less similar than that to
every class mean is declined (``unknown``) instead of being given a confident
wrong label.

Where the classes name categories of the packaged taxonomy, the model also
adds what the backbone's ImageNet head says of those categories
(``TaxonomyPrior``, ``models.layers.CategoryPrior``), weighted by the same
cross-validation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.models.embeddings import leave_one_out_similarity, normalise

METHODS = ("centroid", "logreg")
POWER = 0.5  # the power transform's exponent (``power_transform``; ``models.layers.PowerTransform`` in the model)
LOGIT_SCALE = 16.0  # cosine similarities (-1..1) as logits; the fitted temperature refines it
PRIOR_WEIGHTS = (0.0, 0.125, 0.25, 0.5, 0.75, 1.0)  # the taxonomy prior's weights cross-validation tries
#: The prior's weight where cross-validation cannot pick one (one photo a class: no out-of-fold scores): the
#: largest it may pick. On the README's benchmark at one photo a class, accuracy rose with the weight up to
#: 2 on the development photos (70.8% without, 81.8% at 1) and peaked at 1-1.5 on the test photos (59.0% →
#: 75.0% at 1).
PRIOR_WEIGHT_UNVALIDATED = 1.0
OPEN_SET_MARGIN = 0.05  # below the lowest out-of-fold similarity a class's own photos reached
#: A training photo less similar than this to the rest of its class (leave-one-out, CL2N cosine) is not
#: of that class: the remote in the TV folder. Set on sample_catalog, where the five misfiled photos scored
#: -0.27..0.06 and the lowest real product 0.14 on the raw features; with the power transform the photos
#: labelcat train leaves out score -0.21..-0.05 and the lowest product 0.17 (README, "Few-shot shop models").
OUTLIER_SIMILARITY = 0.10
MIN_CLASS_FOR_OUTLIERS = 3  # a class needs this many photos before one of them can be called unlike the rest


@dataclass
class FewShotFit:
    """What ``fit`` chose and measured."""

    method: str
    mean: np.ndarray  # (D,) centring vector
    weights: np.ndarray  # (D, C)
    bias: np.ndarray  # (C,)
    centroids: np.ndarray  # (C, D) unit class means in the normalised space
    cv: dict[str, Any]  # per-method out-of-fold accuracy, the folds, and the chosen method's oof logits
    min_similarity: float | None  # open-set threshold, None if it could not be measured
    prior_weight: float = 0.0  # the taxonomy prior's weight (``TaxonomyPrior``); 0: not used

    def embed(self, x: np.ndarray) -> np.ndarray:
        """Pooled features → what the saved model's logits layer reads (and the night's checks compare)."""
        return normalise(power_transform(x), self.mean)


@dataclass
class TaxonomyPrior:
    """The classes' categories in the packaged taxonomy, where each class names one: the zero-shot evidence a
    shop model adds to its few-shot logits (``models.layers.CategoryPrior``).

    Why: the few photos of a class say little; the backbone's ImageNet head, folded by the taxonomy, already
    says which of the shop's categories a photo shows (the default model's answer given the catalogue). On
    the README's benchmark this took 3 and 5 photos a class from 83.3% to 86.3% and from 88.1% to 90.0%.
    Classes of one category (t-shirts, hoodies) get the same term, so the photos alone tell them apart.
    """

    categories: list[str]  # the distinct categories, in the taxonomy's order
    classes: list[int]  # class c's index into ``categories``
    columns: list[int]  # each of ``categories``' column among the taxonomy's categories

    def log_prior(self, folded: np.ndarray) -> np.ndarray:
        """(N, C) ``log P(class's category)`` among ``categories``, from (N, taxonomy categories) folded
        ImageNet probabilities (``Taxonomy.aggregate``): what ``CategoryPrior`` computes in the model."""
        from pipeline.models.layers import PRIOR_EPS

        mass = folded[:, self.columns].astype(np.float64)
        share = mass / np.maximum(mass.sum(axis=1, keepdims=True), 1e-12)
        return np.log(share[:, self.classes] + PRIOR_EPS).astype(np.float32)

    def membership(self, product_matrix: np.ndarray) -> np.ndarray:
        """(1000, len(categories)) 0/1: which ImageNet classes fold into each category."""
        return product_matrix[:, self.columns].astype(np.float32)


def taxonomy_prior(classes: list[str], taxonomy) -> TaxonomyPrior | None:
    """The prior when every class names a taxonomy category (``Taxonomy.resolve_hint``: a folder name or the
    category itself) and they name two or more; otherwise None (one unknown name and the prior would
    weigh the named classes against it on no evidence)."""
    named = [taxonomy.resolve_hint(c) for c in classes]
    if any(c is None for c in named) or len(set(named)) < 2:
        return None
    cats = [c for c in taxonomy.categories if c in set(named)]
    return TaxonomyPrior(cats, [cats.index(c) for c in named], [taxonomy.categories.index(c) for c in cats])


def _prior_weight(oof: np.ndarray, prior: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, float]]:
    """The ``PRIOR_WEIGHTS`` entry whose out-of-fold logits plus weight x prior label the most training
    photos right (then: the highest mean log-likelihood of their labels), with each weight's accuracy."""
    def score(w: float) -> tuple[float, float]:
        z = oof + w * prior
        z = z - z.max(axis=1, keepdims=True)
        loglik = z[np.arange(len(y)), y] - np.log(np.exp(z).sum(axis=1))
        return float((z.argmax(axis=1) == y).mean()), float(loglik.mean())

    scores = {w: score(w) for w in PRIOR_WEIGHTS}
    best = max(PRIOR_WEIGHTS, key=lambda w: scores[w])
    return best, {f"{w:g}": round(a, 4) for w, (a, _) in scores.items()}


def power_transform(x: np.ndarray) -> np.ndarray:
    """The pooled features as the few-shot head reads them: ``max(x, 0) ** POWER`` (``PowerTransform``)."""
    return np.power(np.maximum(x, 0.0) + 1e-12, POWER).astype(np.float32)


def class_outliers(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of photos unlike the rest of their class (classes of ``MIN_CLASS_FOR_OUTLIERS``+ photos), in
    the space the night's checks see (``power_transform``, then CL2N)."""
    sim = leave_one_out_similarity(power_transform(x), y)
    sizes = np.bincount(y)
    big = sizes[y] >= MIN_CLASS_FOR_OUTLIERS
    return np.flatnonzero(big & (sim < OUTLIER_SIMILARITY))


def centroid_rule(z: np.ndarray, y: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    c = np.stack([z[y == k].mean(axis=0) for k in range(n)])
    c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-8)
    return c.T * LOGIT_SCALE, np.zeros(n, np.float32), c


def _logreg_fit(z: np.ndarray, y: np.ndarray, n: int, w0: np.ndarray, l2: float = 1e-3,
                steps: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Softmax regression by full-batch gradient descent with momentum (seconds for hundreds of photos),
    started from the centroid rule's weights ``w0``."""
    w = w0.astype(np.float64)
    b = np.zeros(n)
    onehot = np.eye(n)[y]
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    lr = 0.5
    for _ in range(steps):
        logits = z @ w + b
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        g = (p - onehot) / len(y)
        gw = z.T @ g + l2 * w
        gb = g.sum(axis=0)
        vw = 0.9 * vw - lr * gw
        vb = 0.9 * vb - lr * gb
        w += vw
        b += vb
    return w.astype(np.float32), b.astype(np.float32)


def _folds(y: np.ndarray, groups: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """Stratified, group-aware folds: each class's groups dealt round-robin (near copies stay together)."""
    rng = np.random.default_rng(seed)
    assign = np.zeros(len(y), int)
    for cls in np.unique(y):
        cls_groups = np.unique(groups[y == cls])
        rng.shuffle(cls_groups)
        for i, g in enumerate(cls_groups):
            assign[(groups == g) & (y == cls)] = i % k
    return [np.flatnonzero(assign == f) for f in range(k)]


def _weights(method: str, z: np.ndarray, y: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    w, b, c = centroid_rule(z, y, n)
    if method == "logreg":
        w, b = _logreg_fit(z, y, n, w)
    return w, b, c


def fit(x: np.ndarray, y: np.ndarray, groups: np.ndarray, n: int, method: str = "auto", seed: int = 42,
        prior: np.ndarray | None = None) -> FewShotFit:
    """Fit the few-shot head on pooled features ``x`` (N, D) with labels ``y`` in 0..n-1 (``power_transform``
    is applied here; ``FewShotFit.embed`` maps new features into the fitted space).

    Cross-validation uses k = min(5, the smallest class's number of groups)
    folds; with fewer than 2 groups in some class there is no out-of-fold
    evidence, so ``centroid`` is used and no temperature or open-set threshold
    is fitted (the card says so). ``prior``: (N, n) ``TaxonomyPrior.log_prior``
    of the training photos; its weight is picked on the chosen method's
    out-of-fold logits (``_prior_weight``; ``PRIOR_WEIGHT_UNVALIDATED`` without
    them), and the out-of-fold logits the temperature is fitted on include it.
    """
    x = power_transform(x)
    per_class_groups = min(len(np.unique(groups[y == c])) for c in range(n))
    k = min(5, per_class_groups)
    candidates = list(METHODS) if method == "auto" else [method]
    cv: dict[str, Any] = {"folds": k, "accuracy": {}}
    oof: dict[str, np.ndarray] = {}
    own_sim = np.full(len(y), np.nan)
    if k >= 2:
        folds = _folds(y, groups, k, seed)
        for m in candidates:
            logits = np.zeros((len(y), n), np.float32)
            for test in folds:
                train = np.setdiff1d(np.arange(len(y)), test)
                if len(np.unique(y[train])) < n:
                    continue
                mean = x[train].mean(axis=0)
                zt, zs = normalise(x[train], mean), normalise(x[test], mean)
                w, b, c = _weights(m, zt, y[train], n)
                logits[test] = zs @ w + b
                if m == candidates[0]:
                    own_sim[test] = np.einsum("ij,ij->i", zs, c[y[test]])
            oof[m] = logits
            cv["accuracy"][m] = float((logits.argmax(axis=1) == y).mean())
        chosen = max(candidates, key=lambda m: (cv["accuracy"][m], m == "logreg"))
    else:
        chosen = "centroid" if method == "auto" else method
    mean = x.mean(axis=0)
    z = normalise(x, mean)
    w, b, c = _weights(chosen, z, y, n)
    weight = 0.0
    if prior is not None and chosen in oof:
        weight, cv["taxonomy_prior"] = _prior_weight(oof[chosen], prior, y)
        oof[chosen] = oof[chosen] + weight * prior
    elif prior is not None:
        weight = PRIOR_WEIGHT_UNVALIDATED
    cv["oof_logits"] = oof.get(chosen)
    sims = own_sim[~np.isnan(own_sim)]
    min_similarity = float(sims.min() - OPEN_SET_MARGIN) if len(sims) else None
    return FewShotFit(chosen, mean, w, b, c, cv, min_similarity, weight)


def build_model(features, fitted: FewShotFit, size: int = 224,
                imagenet_head: tuple[np.ndarray, np.ndarray] | None = None,
                prior: tuple[TaxonomyPrior, np.ndarray] | None = None):
    """Frozen backbone → power transform → centring → unit length → the fitted ``Dense``: built-in layers
    and labelcat's registered ``PowerTransform`` only (safe_mode).

    ``imagenet_head``: the backbone's own ImageNet classifier (weights, bias), kept as a second output
    (``imagenet``) on the same pooled features. Why: a shop model knows only the shop's classes, so it
    cannot tell a photo of a dog from a product unlike its classes; its frozen backbone still can. The night
    folds that output through the taxonomy into the same not-product evidence the default model junks on
    (``stages.junk.semantic_reason``), at the cost of one 1280 x 1000 matrix product a photo.

    ``prior``: the classes' ``TaxonomyPrior`` and the taxonomy's product matrix; with the ImageNet head and
    a fitted ``prior_weight`` above 0, the first output is the few-shot logits plus ``CategoryPrior`` of
    the ImageNet logits (the embedding is still what the ``logits`` layer reads)."""
    import keras
    from keras import layers

    from pipeline.models.layers import CategoryPrior, PowerTransform

    features.trainable = False
    inputs = keras.Input((size, size, 3), name="image")
    pooled = features(inputs, training=False)
    x = PowerTransform(POWER, name="power")(pooled)
    x = layers.Normalization(mean=fitted.mean, variance=np.ones(len(fitted.mean)), name="centre")(x)
    x = layers.UnitNormalization(name="unit")(x)
    logits = layers.Dense(fitted.weights.shape[1], name="logits", dtype="float32")
    outputs = [logits(x)]
    folding = None
    if imagenet_head is not None:
        imagenet = layers.Dense(imagenet_head[0].shape[1], name="imagenet", dtype="float32")
        outputs.append(imagenet(pooled))
        if prior is not None and fitted.prior_weight > 0:
            spec, product_matrix = prior
            folding = CategoryPrior(len(spec.categories), spec.classes, fitted.prior_weight,
                                    imagenet=imagenet_head[0].shape[1], name="taxonomy_prior", dtype="float32")
            outputs[0] = layers.Add(name="shop_logits", dtype="float32")([outputs[0], folding(outputs[1])])
    model = keras.Model(inputs, outputs if len(outputs) > 1 else outputs[0], name=f"fewshot_{fitted.method}")
    logits.set_weights([fitted.weights, fitted.bias])
    if imagenet_head is not None:
        imagenet.set_weights(list(imagenet_head))
    if folding is not None:
        folding.set_weights([spec.membership(product_matrix)])
    return model


def open_set_card(fitted: FewShotFit) -> dict[str, Any] | None:
    """The card's ``open_set`` entry: unit class means (rounded) and the similarity below which a photo is declined."""
    if fitted.min_similarity is None:
        return None
    return {"centroids": np.round(fitted.centroids, 5).tolist(), "min_similarity": round(fitted.min_similarity, 4),
            "rule": f"declined when its cosine similarity to every class mean is below min_similarity "
                    f"(the lowest out-of-fold similarity of a training photo to its own class, minus {OPEN_SET_MARGIN})"}


def paths_embeddings(paths: list[Path], backbone, batch_size: int = 32):
    """``Predictions`` of each photo through the classify stage (the same decode and compiled step), from the
    loaded ``Backbone`` whose frozen trunk the few-shot model is then built on (loaded once for both): the
    pooled features, and the backbone's ImageNet evidence folded by the packaged taxonomy (product and
    not-product masses), which ``labelcat train`` reads to leave non-products out of the training folders."""
    from pipeline.models.classifier import Classifier
    from pipeline.models.preprocess import IMAGENET_224
    from pipeline.models.taxonomy import load_taxonomy
    from pipeline.stages.classify import predict

    n_out = int(backbone.model.outputs[0].shape[-1])
    tax = load_taxonomy() if n_out == 1000 else None
    clf = Classifier(name=backbone.name, version=backbone.weights_sha256, model=backbone.model, preprocess=IMAGENET_224,
                     categories=list(tax.categories) if tax else [str(i) for i in range(n_out)], taxonomy=tax)
    return predict(clf, paths, batch_size=batch_size)
