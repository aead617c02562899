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

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.models.card import ModelCard, fingerprint, save_model
from pipeline.models.preprocess import IMAGENET_224, Preprocess
from pipeline.stages.decode import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from pipeline.stages.dedupe import find_duplicates
from pipeline.stages.scan import Scan, candidate, scan_records
from pipeline.stages.ingest import IngestError, ingest
from pipeline.stages.junk import JunkConfig, quality_reason
from pipeline.ops.device import has_gpu
from pipeline.learning.recipe import TrainConfig, brief, calibrate, callbacks, compile_model, machine, stratified_split

MIN_PER_CLASS = 3  # fewer photos in a class: say what the card's calibration and threshold can mean


# ---------------------------------------------------------------- shop photos


@dataclass
class LabelledPhotos:
    paths: list[Path]
    labels: list[str]
    groups: list[int]
    sha256: list[str]
    skipped: list[tuple[str, str]]  # (path, reason)


def _labelled_records(source: str | Path) -> tuple[list, dict[int, str]]:
    """Records of one source and each one's label (folder name, manifest ``label`` column, or a person's)."""
    from pipeline.review.sheet import corrections_batch, corrections_store_exists

    batch = corrections_batch(source) if corrections_store_exists(source) else ingest(source)
    records = list(batch.records)  # training sets are small enough to hold
    if batch.source in ("manifest", "corrections"):
        label_col = batch.column("label")
        if label_col is None:
            raise IngestError(f"manifest {str(source)!r} needs a 'label' column to train on")
        return records, {r.row: (r.extra.get(label_col) or "").strip() for r in records}
    return records, {r.row: (r.category_hint or "").strip() for r in records}


def source_text(data: str | Path | list) -> str:
    """The training sources as the card and messages name them."""
    return ", ".join(map(str, data)) if isinstance(data, (list, tuple)) else str(data)


def collect(data: str | Path | list, workers: int = 0, quiet: bool = True) -> LabelledPhotos:
    """Labelled photos from one or several sources: class-folder trees, manifests with a ``label``
    column, and review corrections stores (the photos people labelled).

    Runs the same scan as ``labelcat run``: unreadable, broken and blank files
    are skipped with their reason; near duplicates share a group id. People's
    verdicts in any corrections store given win over folder and manifest
    labels, matched by content (sha256): a photo marked junk or duplicate is
    left out, a corrected label replaces the folder's, spelled as the folders
    spell it (any case). A correction whose label no folder uses while folders
    are given is refused with a line, and the photo keeps its folder label.
    """
    from pipeline.review.sheet import SPECIAL_LABELS, corrections_store_exists, load_corrections

    sources = list(data) if isinstance(data, (list, tuple)) else [data]
    verdicts: dict[str, dict] = {}
    records, labels, from_store = [], {}, set()
    for source in sources:
        if corrections_store_exists(source):
            verdicts.update(load_corrections(source))
        recs, labs = _labelled_records(source)
        for rec in recs:  # rows renumbered across sources
            old = rec.row
            rec.row = len(records)
            labels[rec.row] = labs[old]
            if corrections_store_exists(source):
                from_store.add(rec.row)
            records.append(rec)
    vocabulary = {labels[r]: labels[r] for r in labels if r not in from_store and labels[r]}
    canonical = {k.lower(): k for k in vocabulary}
    scans = scan_records(records, DEFAULT_MAX_PIXELS, DEFAULT_MAX_BYTES, workers, quiet)
    skipped: list[tuple[str, str]] = []
    kept, seen_sha = [], set()
    for rec in records:
        s = scans[rec.row]
        if not isinstance(s, Scan):
            skipped.append((rec.path, f"{s[0]}: {s[1]}"))
            continue
        verdict = verdicts.get(s.sha256)
        if verdict is not None and verdict["corrected_label"] in SPECIAL_LABELS:
            skipped.append((rec.path, f"a reviewer marked it {verdict['corrected_label']}"))
            continue
        if verdict is not None:
            said = verdict["corrected_label"]
            if not canonical or said.lower() in canonical:
                labels[rec.row] = canonical.get(said.lower(), said)
            elif rec.row not in from_store:
                skipped.append((rec.path, f"correction {said!r} is not one of the folders' labels "
                                          f"({', '.join(sorted(vocabulary))}); kept its folder label"))
            else:
                skipped.append((rec.path, f"correction {said!r} is not one of the folders' labels"))
                continue
        if s.sha256 in seen_sha:
            continue  # the same photo from two sources
        if not labels[rec.row]:
            skipped.append((rec.path, "no label"))
        elif reason := quality_reason(s.quality, s.width, s.height, JunkConfig()):
            skipped.append((rec.path, reason))
        else:
            kept.append((rec, s))
            seen_sha.add(s.sha256)
    dups = find_duplicates([candidate(r.row, s) for r, s in kept])
    return LabelledPhotos(
        paths=[r.resolved for r, _ in kept],
        labels=[labels[r.row] for r, _ in kept],
        groups=[dups[r.row].kept if r.row in dups else r.row for r, _ in kept],
        sha256=[s.sha256 for _, s in kept],
        skipped=skipped,
    )


def photo_dataset(paths: list[Path], labels: np.ndarray, preprocess: Preprocess, batch: int, shuffle: bool, seed: int):
    """Training input: the classify stage's photo loader over shuffled indices, with labels; the
    validation split (not shuffled) is decoded once and cached."""
    import tensorflow as tf

    from pipeline.stages.classify import PREFETCH_BATCHES, decode_indices

    targets = tf.constant(labels.astype(np.int32))
    indices = tf.data.Dataset.range(len(paths))
    if shuffle:
        indices = indices.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    d = decode_indices(indices, paths, preprocess).map(lambda i, pixels, err: (tf.cast(pixels, tf.float32),
                                                                                tf.gather(targets, i)))
    if not shuffle:
        d = d.cache()
    return d.batch(batch).prefetch(PREFETCH_BATCHES)


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


def _shop_card(out: str | Path, data: str | Path | list, classes: list[str], photos: LabelledPhotos, cfg: TrainConfig,
               bb, model, cal: dict, arch: str, data_extra: dict, training: dict, open_set: dict | None = None,
               validated: bool = True, imagenet_evidence: dict | None = None) -> ModelCard:
    """The card of a shop model (few-shot or fine-tuned): what it learned from, how well, how to trust it."""
    return ModelCard(
        name=Path(out).name, classes=classes, preprocess=IMAGENET_224.to_dict(), arch=arch, backbone=cfg.backbone,
        weights_origin=bb.weights_origin,
        training_data={"source": source_text(data), "per_class": dict(Counter(photos.labels)), **data_extra,
                       "skipped": len(photos.skipped), "fingerprint": fingerprint(list(zip(photos.sha256, photos.labels))),
                       "sha256": sorted(set(photos.sha256))},
        metrics={"validation": brief(cal["validation"])} if validated else {},
        temperature=cal["temperature"], ece_before=cal["ece_before"], ece_after=cal["ece_after"],
        recommended_threshold=cal["recommended_threshold"],
        training={**training, "machine": machine(), "parameters": int(model.count_params()), "seed": cfg.seed},
        open_set=open_set, imagenet_evidence=imagenet_evidence,
    )


def train_fewshot(data: str | Path, out: str | Path, cfg: TrainConfig, photos: LabelledPhotos, classes: list[str],
                  y: np.ndarray, groups: np.ndarray) -> ModelCard:
    """The default: a linear rule on frozen embeddings (``fewshot``), cross-validated, calibrated, open-set."""
    from pipeline.learning.fewshot import (POWER, build_model, class_outliers, fit, open_set_card, paths_embeddings,
                                           taxonomy_prior)
    from pipeline.models.backbones import backbone_features, imagenet_head
    from pipeline.models.taxonomy import load_taxonomy
    from pipeline.stages.junk import JunkConfig, not_product_evidence

    t0 = time.perf_counter()
    features, bb = backbone_features(cfg.backbone, 224)
    preds = paths_embeddings(photos.paths, bb)
    errors = preds.errors
    ok = np.array([e is None for e in errors])
    if not ok.all():
        for i in np.flatnonzero(~ok):
            cfg.log(f"skipped {photos.paths[i]}: {errors[i][0]}: {errors[i][1]}")
    emb, y, groups = preds.embeddings[ok], y[ok], groups[ok]
    paths = [p for p, keep in zip(photos.paths, ok) if keep]
    # The remote in the TV folder, left out twice over: a photo unlike its class (classes of 3+ photos), and
    # a photo the backbone's ImageNet evidence says is no product at all, unless most of its class's photos
    # show the same: then the shop sells what ImageNet sees there (collars worn by dogs), and that evidence
    # is ignored at night too (``imagenet_evidence.ignored`` in the card).
    tax = load_taxonomy()
    seen = [not_product_evidence(float(m), g, tax.groups if g.size else [], JunkConfig())
            for m, g in zip(preds.product_mass[ok], preds.group_mass[ok])]
    ignored: set[str] = set()
    for k in range(len(classes)):
        members = np.flatnonzero(y == k)
        shown = Counter(seen[i][0] for i in members if seen[i])
        ignored |= {what for what, count in shown.items() if 2 * count > len(members)}
    not_products = {i: e[1] for i, e in enumerate(seen) if e and e[0] not in ignored}
    unlike = set(class_outliers(emb, y).tolist())
    outliers = np.array(sorted(unlike | set(not_products)), int)
    for i in outliers:
        cfg.log(f"left out {paths[i]}: " + (f"{not_products[i]} (not trained on; review it)" if i in not_products else
                f"unlike the other photos labelled {classes[y[i]]} (not trained on; review it)"))
    keep = np.setdiff1d(np.arange(len(y)), outliers)
    emb, y, groups = emb[keep], y[keep], groups[keep]
    head = imagenet_head(bb)
    # the classes' taxonomy categories: the backbone's ImageNet head says which of them a photo shows
    spec = taxonomy_prior(classes, tax) if head is not None else None
    prior = spec.log_prior(preds.probs[ok][keep]) if spec is not None else None
    fitted = fit(emb, y, groups, len(classes), cfg.method, cfg.seed, prior=prior)
    model = build_model(features, fitted, imagenet_head=head,
                        prior=(spec, tax.product_matrix) if spec is not None else None)
    evidence = None if head is None else {
        "output": "imagenet", "taxonomy": f"{tax.name}-{tax.version}-{tax.digest}",
        "rule": "the backbone's ImageNet probabilities, folded by the packaged taxonomy at night, junk a photo "
                "that is not a product (not_product, no_product) as the default model does, except what most "
                "photos of a class showed in training (ignored: the shop sells it, its mass counts as product evidence)",
        "ignored": sorted(ignored)}
    seconds = time.perf_counter() - t0
    oof = fitted.cv.pop("oof_logits")
    if oof is not None:
        cal = calibrate(oof.astype(np.float64), y, classes, cfg.target_precision)
    else:
        cal = calibrate(np.zeros((0, len(classes))), np.zeros(0, int), classes, cfg.target_precision)
    counts = Counter(classes[k] for k in y)
    card = _shop_card(out, data, classes, photos, cfg, bb, model, cal, arch=f"fewshot_{fitted.method}_{cfg.backbone}",
                      data_extra={"photos": int(len(y)), "per_class": dict(counts),
                                  "left_out_as_outliers": [str(paths[i]) for i in outliers]},
                      training={"method": fitted.method, "cross_validation": fitted.cv, "seconds": round(seconds, 1),
                                "taxonomy_prior": _prior_card(spec, classes, fitted.prior_weight, fitted.cv, tax,
                                                              head is not None),
                                "features": f"pooled features ** {POWER} (PowerTransform), centred, unit length",
                                "calibration": cal["calibration"] + (" (out-of-fold scores)" if oof is not None else "")},
                      open_set=open_set_card(fitted), validated=oof is not None, imagenet_evidence=evidence)
    save_model(model, card, out, force=cfg.force)
    acc = fitted.cv["accuracy"].get(fitted.method)
    cfg.log(f"few-shot {fitted.method} on {len(y)} photos in {len(classes)} classes: cross-validated accuracy "
            + (f"{acc:.3f}" if acc is not None else "n/a") + f", T={cal['temperature']:.2f}, {seconds:.0f}s; saved to {out}")
    return card


def _prior_card(spec, classes: list[str], weight: float, cv: dict[str, Any], tax, has_head: bool) -> dict[str, Any]:
    """The card's ``training.taxonomy_prior``: the classes' categories and the weight cross-validation chose
    (``fewshot.TaxonomyPrior``), or why there is none."""
    from pipeline.learning.fewshot import PRIOR_WEIGHT_UNVALIDATED

    if spec is None:
        unnamed = [c for c in classes if tax.resolve_hint(c) is None]
        why = ("the backbone keeps no ImageNet head to read it from" if not has_head else
               f"classes {', '.join(unnamed)} name no category of the taxonomy" if unnamed else
               "the classes name fewer than two categories of the taxonomy")
        return {"weight": 0.0, "why_not": why}
    return {"weight": weight, "taxonomy": f"{tax.name}-{tax.version}-{tax.digest}",
            "categories": {c: spec.categories[k] for c, k in zip(classes, spec.classes)},
            "accuracy_by_weight": cv.get("taxonomy_prior"),
            "rule": "the few-shot logits plus weight x log P(the class's category), the backbone's ImageNet "
                    "probabilities folded by the taxonomy among the classes' categories; the weight with the best "
                    "out-of-fold accuracy on the training photos (0: not used)"
                    + ("" if cv.get("taxonomy_prior") else
                       f"; without out-of-fold scores (one photo a class) the default, {PRIOR_WEIGHT_UNVALIDATED:g}")}


def train_images(data: str | Path | list, out: str | Path, cfg: TrainConfig) -> tuple[ModelCard, LabelledPhotos]:
    """Train a shop classifier from labelled photos (few-shot by default, or fine-tuning); save model + card."""
    import keras

    photos = collect(data, quiet=cfg.quiet)
    for path, reason in photos.skipped:
        cfg.log(f"skipped {path}: {reason}")
    classes = sorted(set(photos.labels))
    if len(classes) < 2:
        raise IngestError(f"need at least two labels to train on, found {classes or 'none'} in {source_text(data)}")
    y = np.array([classes.index(label) for label in photos.labels])
    groups = np.array(photos.groups)
    train_idx, val_idx = stratified_split(y, groups, cfg.val_split, cfg.seed)
    counts = Counter(photos.labels)
    cfg.log(f"{len(y)} photos in {len(classes)} classes ({', '.join(f'{c} {counts[c]}' for c in classes)})"
            + ("" if cfg.method != "finetune" else f"; {len(train_idx)} train / {len(val_idx)} validation"))

    small = sorted(c for c in classes if counts[c] < MIN_PER_CLASS)
    if small:
        cfg.log(f"warning: {', '.join(small)} ha{'s' if len(small) == 1 else 've'} fewer than {MIN_PER_CLASS} photos: "
                "the card's validation, temperature and review threshold rest on very few photos (with one photo a "
                "class they cannot be fitted at all: T = 1, no open-set threshold, the card says so)")
    if cfg.method != "finetune":
        return train_fewshot(data, out, cfg, photos, classes, y, groups), photos

    keras.utils.set_random_seed(cfg.seed)
    mixed = has_gpu()
    if mixed:
        keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        from pipeline.models.backbones import backbone_features

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
    monitor = callbacks(cfg.quiet) if ds_va is not None else []
    t0 = time.perf_counter()
    compile_model(model, lr)
    h1 = model.fit(ds_tr, validation_data=ds_va, epochs=epochs, callbacks=monitor, shuffle=False,
                   verbose=0 if cfg.quiet else 2)
    phases = [{"phase": "frozen backbone + new head", "epochs_run": len(h1.history["loss"]), "learning_rate": lr}]
    if cfg.fine_tune_epochs and cfg.fine_tune_blocks:
        opened = unfreeze_top(features, cfg.fine_tune_blocks)
        compile_model(model, lr / 10)
        h2 = model.fit(ds_tr, validation_data=ds_va, epochs=cfg.fine_tune_epochs, shuffle=False,
                       callbacks=callbacks(cfg.quiet) if ds_va is not None else [], verbose=0 if cfg.quiet else 2)
        phases.append({"phase": f"fine-tune top {cfg.fine_tune_blocks} blocks", "epochs_run": len(h2.history["loss"]),
                       "learning_rate": lr / 10, "trainable_layers": len(opened)})
    seconds = time.perf_counter() - t0

    if ds_va is not None:
        val_logits = np.concatenate([model(xb, training=False).numpy() for xb, _ in ds_va]).astype(np.float64)
    else:
        val_logits = np.zeros((0, len(classes)))
    cal = calibrate(val_logits, y[val_idx], classes, cfg.target_precision)
    card = _shop_card(out, data, classes, photos, cfg, bb, model, cal, arch=f"transfer_{cfg.backbone}_224",
                      data_extra={"photos": len(y), "train": int(len(train_idx)), "validation": int(len(val_idx))},
                      training={"phases": phases, "seconds": round(seconds, 1), "batch_size": batch,
                                "calibration": cal["calibration"], "mixed_precision": mixed})
    save_model(model, card, out, force=cfg.force)
    acc = cal["validation"]["accuracy"] if len(val_idx) else float("nan")
    cfg.log(f"validation accuracy {acc:.3f} on {len(val_idx)} photos, T={cal['temperature']:.2f}, "
            f"{seconds:.0f}s; saved to {out}")
    return card, photos
