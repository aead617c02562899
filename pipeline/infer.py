"""Classify: a ``tf.data`` decode → batch → prefetch loop feeding a compiled model.

Why this shape: the model is cheap next to JPEG decoding, so the loop keeps
every core decoding in parallel (Pillow releases the GIL while it decodes and
resizes) while the previous batch runs through the network, and the network
runs as one traced ``tf.function`` per batch rather than ``model.predict``'s
per-call overhead. On a GPU the model is rebuilt under mixed precision.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .backbones import BACKBONES
from .decode import DEFAULT_MAX_PIXELS, IMAGENET_224, DecodeError, Preprocess
from .registry import Registry
from .taxonomy import Taxonomy, imagenet_classes, load_taxonomy

PRECISIONS = ("auto", "float32", "mixed")


@dataclass
class Classifier:
    """A ready-to-run model and what the output rows need to say about it.

    ``taxonomy`` is set for ImageNet models (their 1000 outputs are folded
    into shop categories); ``categories`` are the labels confidences are over.
    """

    name: str
    version: str
    model: "keras.Model"  # noqa: F821
    preprocess: Preprocess
    categories: list[str]
    taxonomy: Taxonomy | None = None
    temperature: float = 1.0
    precision: str = "float32"
    info: dict = field(default_factory=dict)


@dataclass
class Predictions:
    """Per-row model outputs, aligned with the paths given to ``predict``."""

    probs: np.ndarray  # (N, len(categories)), rows of failed decodes are zero
    product_mass: np.ndarray  # (N,) ImageNet mass on product classes (1.0 for shop models)
    group_mass: np.ndarray  # (N, G) mass per not-product group
    imagenet_top: list[str | None]  # top ImageNet class with its probability, for reviewers
    errors: list[tuple[str, str] | None]  # decode failures met at classification time


MODELS: Registry = Registry("model")


_GPU: bool | None = None


def has_gpu() -> bool:
    """Whether TensorFlow sees a GPU; the first call imports TensorFlow.

    TensorFlow 2.21 prints absl INFO/ERROR lines (oneDNN notes, "could not find
    cuda drivers") before any log-level variable is read; they would land in
    every cron mail, so stderr is muted for the import and the device probe
    unless ``LABELCAT_TF_LOGS=1``.
    """
    global _GPU
    if _GPU is None:
        with _muted_stderr(os.environ.get("LABELCAT_TF_LOGS") != "1"):
            import tensorflow as tf

            _GPU = bool(tf.config.list_physical_devices("GPU"))
    return _GPU


@contextlib.contextmanager
def _muted_stderr(mute: bool) -> Iterator[None]:
    if not mute:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _imagenet_classifier(backbone: str, taxonomy: Taxonomy | None, precision: str) -> Classifier:
    has_gpu()  # import TensorFlow quietly before Keras does
    bb = BACKBONES.get(backbone)()
    tax = taxonomy or load_taxonomy()
    model = to_mixed_precision(bb.model) if precision == "mixed" else bb.model
    return Classifier(
        name=backbone,
        version=f"imagenet-{bb.weights_sha256[:8]}+{tax.name}-{tax.version}-{tax.digest}",
        model=model,
        preprocess=IMAGENET_224,
        categories=list(tax.categories),
        taxonomy=tax,
        precision=precision,
        info={"weights_origin": bb.weights_origin},
    )


@MODELS.register("efficientnet_lite0")
def efficientnet_lite0(taxonomy: Taxonomy | None = None, precision: str = "float32") -> Classifier:
    """Zero-shot shop labels from ImageNet EfficientNet-Lite0 through the taxonomy (default)."""
    return _imagenet_classifier("efficientnet_lite0", taxonomy, precision)


@MODELS.register("mobilenet_v2")
def mobilenet_v2(taxonomy: Taxonomy | None = None, precision: str = "float32") -> Classifier:
    """Zero-shot shop labels from ImageNet MobileNetV2 (needs its weights file locally)."""
    return _imagenet_classifier("mobilenet_v2", taxonomy, precision)


def resolve_precision(precision: str) -> str:
    """``auto`` means mixed precision on a GPU and float32 on a CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}")
    if precision == "auto":
        return "mixed" if has_gpu() else "float32"
    return precision


MODELS_ENV = "LABELCAT_MODELS"


def resolve_model(ref: str) -> str | Path:
    """A registered name as is, else the model folder it names.

    Looked up in order: the registry, ``ref`` as a path, ``$LABELCAT_MODELS/ref``,
    ``./models/ref``. Raises ``KeyError`` naming what was tried.
    """
    if ref in MODELS:
        return ref
    from .card import CARD_FILE

    candidates = [Path(ref)]
    if os.environ.get(MODELS_ENV):
        candidates.append(Path(os.environ[MODELS_ENV]) / ref)
    candidates.append(Path("models") / ref)
    for c in candidates:
        if (c / CARD_FILE).is_file():
            return c
    raise KeyError(
        f"unknown model {ref!r}: not a registered model ({', '.join(MODELS.list())}) "
        f"nor a model folder with card.json (looked in {', '.join(str(c) for c in candidates)})"
    )


def load_classifier(name: str, taxonomy_path: str | Path | None = None, precision: str = "auto") -> Classifier:
    """A registered model (with its taxonomy) or a trained model folder, at the resolved precision."""
    ref = resolve_model(name)
    if isinstance(ref, Path):
        return _card_classifier(ref, resolve_precision(precision))
    taxonomy = load_taxonomy(taxonomy_path) if taxonomy_path else None
    return MODELS.get(ref)(taxonomy=taxonomy, precision=resolve_precision(precision))


def _card_classifier(folder: Path, precision: str) -> Classifier:
    """A model trained by ``labelcat train``: its card says labels, pixels and temperature."""
    from .card import load_model

    has_gpu()
    model, card = load_model(folder)
    return Classifier(
        name=card.name,
        version=f"{card.arch}-{card.training_data.get('fingerprint', 'unknown')}-{card.created_at}",
        model=to_mixed_precision(model) if precision == "mixed" else model,
        preprocess=card.preprocessing(),
        categories=list(card.classes),
        temperature=float(card.temperature),
        precision=precision,
        info={"card": str(folder / "card.json"), "recommended_threshold": card.recommended_threshold},
    )


def to_mixed_precision(model):
    """Clone ``model`` with float16 compute (bfloat16 on CPUs) and float32 outputs.

    Mixed precision is a property each layer gets when it is built, so a model
    loaded in float32 has to be cloned layer by layer; the weights are copied
    and the final layer stays float32 so softmax sees full-precision logits.
    """
    import keras

    policy = "mixed_float16" if has_gpu() else "mixed_bfloat16"
    last = model.layers[-1].name

    def clone(layer):
        config = layer.get_config()
        if layer.name != last and not isinstance(layer, keras.layers.InputLayer):
            config["dtype"] = policy
        return layer.__class__.from_config(config)

    mixed = keras.models.clone_model(model, clone_function=clone)
    mixed.set_weights(model.get_weights())
    return mixed


def make_step(classifier: Classifier, jit_compile: bool = False) -> Callable:
    """The compiled per-batch function: uint8 pixels → tempered softmax."""
    import tensorflow as tf

    shape = classifier.preprocess.shape
    model = classifier.model
    temperature = float(classifier.temperature)

    @tf.function(input_signature=[tf.TensorSpec([None, *shape], tf.uint8)], jit_compile=jit_compile)
    def step(pixels):
        logits = model(tf.cast(pixels, tf.float32), training=False)
        return tf.nn.softmax(tf.cast(logits, tf.float32) / temperature, axis=-1)

    return step


def dataset(
    paths: Sequence[Path],
    preprocess: Preprocess,
    batch_size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    parallel: int | None = None,
):
    """``tf.data``: indices → parallel Pillow decode/resize → batch → prefetch.

    The file list stays a Python list and only indices enter the graph, so file
    names that are not valid UTF-8 survive untouched. A decode failure yields a
    black image and an error string instead of stopping the pipeline.
    """
    import tensorflow as tf

    shape = preprocess.shape
    blank = np.zeros(shape, np.uint8)

    def load(i: np.ndarray) -> tuple[np.ndarray, bytes]:
        try:
            return preprocess.load(paths[int(i)], max_pixels), b""
        except DecodeError as exc:
            return blank, f"{exc.code}\t{exc.detail}".encode("utf-8", "replace")
        except Exception as exc:  # noqa: BLE001 - one photo must never stop the batch
            return blank, f"decode_failed\t{type(exc).__name__}: {exc}".encode("utf-8", "replace")

    def tf_load(i):
        pixels, err = tf.numpy_function(load, [i], [tf.uint8, tf.string], stateful=False)
        pixels.set_shape(shape)
        err.set_shape(())
        return i, pixels, err

    ds = tf.data.Dataset.range(len(paths))
    ds = ds.map(tf_load, num_parallel_calls=parallel or tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def predict(
    classifier: Classifier,
    paths: Sequence[Path],
    batch_size: int = 32,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: Callable[[int], None] | None = None,
    jit_compile: bool = False,
) -> Predictions:
    """Run the classifier over ``paths``; returns per-path probabilities and errors."""
    n = len(paths)
    n_out = 1000 if classifier.taxonomy is not None else len(classifier.categories)
    raw = np.zeros((n, n_out), np.float32)
    errors: list[tuple[str, str] | None] = [None] * n
    if n:
        step = make_step(classifier, jit_compile)
        for idx, pixels, errs in dataset(paths, classifier.preprocess, batch_size, max_pixels):
            out = step(pixels).numpy()
            idx = idx.numpy()
            raw[idx] = out
            for i, e in zip(idx, errs.numpy()):
                if e:
                    code, _, detail = e.decode("utf-8", "replace").partition("\t")
                    errors[i] = (code, detail)
                    raw[i] = 0.0
            if progress:
                progress(len(idx))
    return _fold(classifier, raw, errors)


def _fold(classifier: Classifier, raw: np.ndarray, errors: list[tuple[str, str] | None]) -> Predictions:
    tax = classifier.taxonomy
    n = raw.shape[0]
    if tax is None:
        return Predictions(raw, np.ones(n, np.float32), np.zeros((n, 0), np.float32), [None] * n, errors)
    probs, product_mass, group_mass = tax.aggregate(raw)
    names = imagenet_classes()
    top = raw.argmax(axis=1) if n else np.zeros(0, int)
    imagenet_top = [
        None if errors[i] else f"{names[top[i]].split(',')[0]} ({raw[i, top[i]]:.2f})" for i in range(n)
    ]
    for i, e in enumerate(errors):
        if e:
            probs[i] = 0.0
            product_mass[i] = 0.0
            group_mass[i] = 0.0
    return Predictions(probs, product_mass, group_mass, imagenet_top, errors)


def top_k(probs: np.ndarray, categories: Sequence[str], k: int) -> tuple[list[list[str]], list[list[float]]]:
    """Top-k category names and scores per row, best first."""
    k = min(k, probs.shape[1]) if probs.ndim == 2 and probs.shape[1] else 0
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    labels = [[categories[j] for j in row] for row in order]
    scores = [[float(probs[i, j]) for j in row] for i, row in enumerate(order)]
    return labels, scores


def cpu_count() -> int:
    """Cores this process may use (cgroup/affinity aware where the OS says)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1
