"""Classify: a ``tf.data`` decode → batch → prefetch loop feeding a compiled model.

Why this shape: the model is cheap next to JPEG decoding, so the loop keeps
every core decoding in parallel (Pillow releases the GIL while it decodes and
resizes) while the previous batch runs through the network, and the network
runs as one traced ``tf.function`` per batch rather than ``model.predict``'s
per-call overhead. On a GPU the model is rebuilt under mixed precision; on a
CPU the same traced step runs converted, through XNNPACK (``models/lite.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.models.classifier import Classifier
from pipeline.models.preprocess import Preprocess
from pipeline.models.taxonomy import imagenet_classes
from pipeline.ops.device import cpu_count, has_gpu
from pipeline.stages import decode as dec
from pipeline.stages.decode import DEFAULT_MAX_PIXELS, DecodeError

PREFETCH_BATCHES = 2  # the model works on one batch while the next is assembled


@dataclass
class Predictions:
    """Per-row model outputs, aligned with the paths given to ``predict``."""

    probs: np.ndarray  # (N, len(categories)), rows of failed decodes are zero
    product_mass: np.ndarray  # (N,) ImageNet mass on product classes (1.0 for shop models)
    group_mass: np.ndarray  # (N, G) mass per not-product group
    imagenet_top: list[str | None]  # top ImageNet class with its probability, for reviewers
    errors: list[tuple[str, str] | None]  # decode failures met at classification time
    embeddings: np.ndarray  # (N, D) features the logits layer reads (rows of failed decodes are zero)


ENGINES = ("auto", "tensorflow", "xnnpack")


def make_step(classifier: Classifier, jit_compile: bool = False, engine: str = "auto") -> Callable:
    """The compiled per-batch function: uint8 pixels → (tempered softmax, embedding), as arrays or tensors.

    ``engine``: ``tensorflow`` runs the traced ``tf.function``; ``xnnpack`` the
    same function converted to TensorFlow Lite (about twice as fast on a CPU);
    ``auto`` picks XNNPACK for float32 models on a CPU without XLA, and keeps
    TensorFlow where the model's ops cannot be converted.
    Built once per classifier and kept on it: a new ``tf.function`` per chunk
    would trace again every chunk (and TensorFlow warns about retracing in
    cron mail from the sixth chunk on).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}")
    if engine == "auto":
        engine = "xnnpack" if classifier.precision == "float32" and not jit_compile and not has_gpu() else "tensorflow"
    if engine == "tensorflow":
        classifier.info["engine"] = "tensorflow (XLA)" if jit_compile else "tensorflow"
        return _tf_step(classifier, jit_compile)
    if "xnnpack" not in classifier.steps:
        from pipeline.models.lite import lite_step

        step = lite_step(lambda: _tf_step(classifier, False), classifier.step_digest(), classifier.threads or cpu_count(),
                         _raw_outputs(classifier), outputs=_step_outputs(classifier))
        classifier.steps["xnnpack"] = ((step, "xnnpack") if step is not None
                                       else (_tf_step(classifier, False), "tensorflow (not convertible)"))
    step, classifier.info["engine"] = classifier.steps["xnnpack"]
    return step


def _raw_outputs(classifier: Classifier) -> int:
    """The model's own outputs: ImageNet's 1000 classes, or a shop model's categories."""
    return 1000 if classifier.taxonomy is not None else len(classifier.categories)


def _step_outputs(classifier: Classifier) -> int:
    """What the step returns: probabilities and embedding, and a shop model's ImageNet probabilities."""
    return 3 if classifier.evidence is not None else 2


def _tf_step(classifier: Classifier, jit_compile: bool) -> Callable:
    """The traced TensorFlow step (kept on the classifier; the XNNPACK engine is converted from it)."""
    if ("tensorflow", jit_compile) in classifier.steps:
        return classifier.steps[("tensorflow", jit_compile)]
    import tensorflow as tf

    import keras

    shape = classifier.preprocess.shape
    model = classifier.model
    temperature = float(classifier.temperature)
    # The features the last (logits) layer reads are the photo's embedding: returned from the same
    # compiled call, so open-set checks, folder outliers and near-duplicate confirmation cost nothing extra.
    # A shop model with ImageNet evidence names its logits layer and returns ImageNet's logits second.
    head = model.get_layer("logits") if classifier.evidence is not None else model.layers[-1]
    both = keras.Model(model.inputs, [model.outputs[0], head.input, *model.outputs[1:_step_outputs(classifier) - 1]])

    @tf.function(input_signature=[tf.TensorSpec([None, *shape], tf.uint8)], jit_compile=jit_compile)
    def step(pixels):
        logits, features, *imagenet = both(tf.cast(pixels, tf.float32), training=False)
        probs = tf.nn.softmax(tf.cast(logits, tf.float32) / temperature, axis=-1)
        embedding = tf.cast(tf.reshape(features, [tf.shape(features)[0], -1]), tf.float32)
        return (probs, embedding, *(tf.nn.softmax(tf.cast(x, tf.float32), axis=-1) for x in imagenet))

    classifier.steps[("tensorflow", jit_compile)] = step
    return step


def decode_indices(indices, paths: Sequence[Path], preprocess: Preprocess, max_pixels: int = DEFAULT_MAX_PIXELS,
                   parallel: int | None = None, ready: Sequence[np.ndarray | None] | None = None):
    """``tf.data``: a dataset of indices into ``paths`` → (index, pixels, error) by parallel Pillow decode.

    The one photo loader: classification batches it in order, training shuffles
    the indices first. The file list stays a Python list and only indices enter
    the graph, so file names that are not valid UTF-8 survive untouched. A
    decode failure yields a black image and an error string instead of
    stopping the pipeline. ``ready[i]``, when given, is photo i's input already
    cut from the scan's decode: it is used as is, so the photo is not decoded twice.

    Fixed parallelism (one decode per core; ``PREFETCH_BATCHES`` downstream), with
    tf.data's autotuner off: with ``AUTOTUNE``, about every other iterator (one
    per chunk) ended by waiting for the autotuner's next wake-up. On 1,000 photos
    the last ``next`` blocked 17-20 s, until 41.0 s after the iterator started,
    in 2 of 4 runs (TensorFlow 2.21, 2 cores); none of 4 runs with it off
    waited, at the same rate otherwise.
    """
    import tensorflow as tf

    shape = preprocess.shape
    blank = np.zeros(shape, np.uint8)

    def load(i: np.ndarray) -> tuple[np.ndarray, bytes]:
        if ready is not None and ready[int(i)] is not None:
            return ready[int(i)], b""
        try:
            return dec.load_pixels(preprocess, paths[int(i)], max_pixels), b""
        except DecodeError as exc:
            return blank, f"{exc.code}\t{exc.detail}".encode("utf-8", "replace")
        except Exception as exc:  # noqa: BLE001 - one photo must never stop the batch
            return blank, f"decode_failed\t{type(exc).__name__}: {exc}".encode("utf-8", "replace")

    def tf_load(i):
        pixels, err = tf.numpy_function(load, [i], [tf.uint8, tf.string], stateful=False)
        pixels.set_shape(shape)
        err.set_shape(())
        return i, pixels, err

    options = tf.data.Options()
    options.autotune.enabled = False  # options are the whole pipeline's, the batching and prefetch included
    return indices.map(tf_load, num_parallel_calls=parallel or cpu_count(), deterministic=True).with_options(options)


def dataset(
    paths: Sequence[Path],
    preprocess: Preprocess,
    batch_size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    parallel: int | None = None,
    ready: Sequence[np.ndarray | None] | None = None,
):
    """Classification's input: every photo in order → (indices, pixels, errors) batches, prefetched."""
    import tensorflow as tf

    ds = decode_indices(tf.data.Dataset.range(len(paths)), paths, preprocess, max_pixels, parallel, ready)
    return ds.batch(batch_size).prefetch(PREFETCH_BATCHES)


def predict(
    classifier: Classifier,
    paths: Sequence[Path],
    batch_size: int = 32,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: Callable[[int], None] | None = None,
    jit_compile: bool = False,
    ready: Sequence[np.ndarray | None] | None = None,
    engine: str = "auto",
) -> Predictions:
    """Run the classifier over ``paths``; returns per-path probabilities and errors.

    ``ready``: model inputs the scan already cut from its decode (``None`` where
    it did not), so those photos skip the second read and decode. ``engine``:
    see ``make_step``.
    """
    n = len(paths)
    raw = np.zeros((n, _raw_outputs(classifier)), np.float32)
    imagenet = np.zeros((n, 1000 if classifier.evidence is not None else 0), np.float32)
    errors: list[tuple[str, str] | None] = [None] * n
    embeddings = np.zeros((n, 0), np.float32)
    if n:
        step = make_step(classifier, jit_compile, engine)
        for idx, pixels, errs in dataset(paths, classifier.preprocess, batch_size, max_pixels, ready=ready):
            out, feats, *evidence = (np.asarray(t) for t in step(pixels))
            idx = idx.numpy()
            if embeddings.shape[1] != feats.shape[1]:
                embeddings = np.zeros((n, feats.shape[1]), np.float32)
            raw[idx] = out
            embeddings[idx] = feats
            if evidence:
                imagenet[idx] = evidence[0]
            for i, e in zip(idx, errs.numpy()):
                if e:
                    code, _, detail = e.decode("utf-8", "replace").partition("\t")
                    errors[i] = (code, detail)
                    raw[i] = imagenet[i] = embeddings[i] = 0.0
            if progress:
                progress(len(idx))
    return _fold(classifier, raw, errors, embeddings, imagenet)


def _fold(classifier: Classifier, raw: np.ndarray, errors: list[tuple[str, str] | None],
          embeddings: np.ndarray, imagenet: np.ndarray) -> Predictions:
    """The model's outputs as ``Predictions``: an ImageNet model's 1000 classes folded into the taxonomy's
    categories and evidence; a shop model's categories as they are, with the evidence of its ImageNet
    output when it has one (product mass 1 and no groups when not)."""
    n = raw.shape[0]
    tax = classifier.taxonomy or classifier.evidence
    if tax is None:
        return Predictions(raw, np.ones(n, np.float32), np.zeros((n, 0), np.float32), [None] * n, errors, embeddings)
    source = raw if classifier.taxonomy is not None else imagenet
    folded, product_mass, group_mass = tax.aggregate(source)
    probs = folded if classifier.taxonomy is not None else raw
    names = imagenet_classes()
    top = source.argmax(axis=1) if n else np.zeros(0, int)
    imagenet_top = [
        None if errors[i] else f"{names[top[i]].split(',')[0]} ({source[i, top[i]]:.2f})" for i in range(n)
    ]
    if classifier.taxonomy is None:  # a shop model: what its own training photos showed is its products' evidence
        sold = np.array([g in classifier.evidence_ignored for g in tax.groups], bool)
        product_mass += group_mass[:, sold].sum(axis=1)
        group_mass[:, sold] = 0.0
        if "no_product" in classifier.evidence_ignored:
            product_mass[:] = 1.0
    for i, e in enumerate(errors):
        if e:
            probs[i] = 0.0
            product_mass[i] = 0.0
            group_mass[i] = 0.0
    return Predictions(probs, product_mass, group_mass, imagenet_top, errors, embeddings)


def top_k(probs: np.ndarray, categories: Sequence[str], k: int) -> tuple[list[list[str]], list[list[float]]]:
    """Top-k category names and scores per row, best first."""
    k = min(k, probs.shape[1]) if probs.ndim == 2 and probs.shape[1] else 0
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    labels = [[categories[j] for j in row] for row in order]
    scores = [[float(probs[i, j]) for j in row] for i, row in enumerate(order)]
    return labels, scores
