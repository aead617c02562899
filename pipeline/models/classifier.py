"""Classifiers: the registry of ready-made models, trained model folders, and the hint each one understands.

Why apart from the classify stage: a classifier is what a run, ``evaluate``
and the review export all need to name and describe (its categories, version,
temperature, how a category hint maps onto its classes), while only the
classify stage runs images through it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.models.backbones import BACKBONES, weights_file
from pipeline.models.preprocess import IMAGENET_224, Preprocess
from pipeline.models.taxonomy import Taxonomy, load_taxonomy, normalise_hint
from pipeline.ops.device import has_gpu
from pipeline.registry import Registry

PRECISIONS = ("auto", "float32", "mixed")


@dataclass(frozen=True)
class Deferred:
    """A Keras model to load on first use (``Classifier.model``)."""

    load: Callable[[], Any]


class _ModelSlot:
    """``Classifier.model``: a Keras model, or a ``Deferred`` one loaded the first time it is read.

    Why: a run whose converted step is cached (``models/lite.py``) needs only the
    classifier's labels, taxonomy and step key; loading the Keras model is about
    1 s of start-up CPU it would not use. A dataclass field whose default is a
    descriptor is set and read through it; ``__get__`` on the class raises
    ``AttributeError`` so the field keeps no default (Python's "descriptor-typed
    fields").
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self._slot = f"_{name}_slot"

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            raise AttributeError("no default")
        value = obj.__dict__[self._slot]
        if isinstance(value, Deferred):
            value = obj.__dict__[self._slot] = value.load()
        return value

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self._slot] = value


@dataclass
class Classifier:
    """A ready-to-run model and what the output rows need to say about it.

    ``taxonomy`` is set for ImageNet models (their 1000 outputs are folded
    into shop categories); ``categories`` are the labels confidences are over.
    ``model`` may be given ``Deferred``; ``step_key`` (the sha256 of the files
    the model comes from) then finds its converted step without loading it.
    """

    name: str
    version: str
    model: "keras.Model" = _ModelSlot()  # noqa: F821 - or Deferred; read as the loaded model
    preprocess: Preprocess
    categories: list[str]
    taxonomy: Taxonomy | None = None
    temperature: float = 1.0
    precision: str = "float32"
    info: dict = field(default_factory=dict)
    steps: dict = field(default_factory=dict, repr=False)  # compiled per-batch functions, by option (classify)
    step_key: str | None = None  # the model's source files by sha256, when known before loading it
    evidence: Taxonomy | None = None  # a shop model's: folds its second (ImageNet) output into not-product evidence
    evidence_ignored: frozenset[str] = frozenset()  # ...except what most photos of a class showed in training
    threads: int | None = None  # CPU threads its XNNPACK engine may use (None: every core this process may use)

    @property
    def groups(self) -> list[str]:
        """The not-product evidence groups its predictions carry (none for a shop model without ImageNet's)."""
        tax = self.taxonomy or self.evidence
        return list(tax.groups) if tax else []

    def step_digest(self) -> str:
        """The digest its converted XNNPACK step is cached under (``models/lite.py``): from ``step_key`` when
        the model's source files are known, so the cache is found without loading the model; else from the
        loaded weights."""
        from pipeline.models.lite import key_digest, step_digest

        temperature, shape = float(self.temperature), self.preprocess.shape
        return (key_digest(self.step_key, temperature, shape) if self.step_key
                else step_digest(self.model, temperature, shape))

    @property
    def loaded(self) -> bool:
        """Whether the Keras model is in memory (``model`` has been read, or was given loaded)."""
        return not isinstance(self.__dict__["_model_slot"], Deferred)

    def hint_category(self, hint: str | None) -> str | None:
        """The category a folder name or manifest hint names: through the taxonomy's aliases for
        ImageNet models, by case/separator-insensitive name for trained models."""
        if not hint:
            return None
        if self.taxonomy is not None:
            return self.taxonomy.resolve_hint(hint)
        key = normalise_hint(hint)
        return next((c for c in self.categories if normalise_hint(c) == key), None)


MODELS: Registry = Registry("model")


def _imagenet_classifier(backbone: str, taxonomy: Taxonomy | None, precision: str) -> Classifier:
    has_gpu()  # import TensorFlow quietly before Keras does
    tax = taxonomy or load_taxonomy()

    def load():
        return at_precision(BACKBONES.get(backbone)().model, precision)

    weights = weights_file(backbone)
    if weights is None:  # a backbone that does not name its weights file: built now, and described by itself
        bb = BACKBONES.get(backbone)()
        weights_sha256, origin, key = bb.weights_sha256, bb.weights_origin, None
        model = at_precision(bb.model, precision)
    else:
        weights_sha256, origin, key = weights.sha256, weights.origin, f"{backbone}:{weights.sha256}"
        model = Deferred(load)
    clf = Classifier(
        name=backbone,
        version=f"imagenet-{weights_sha256[:8]}+{tax.name}-{tax.version}-{tax.digest}",
        model=model,
        preprocess=IMAGENET_224,
        categories=list(tax.categories),
        taxonomy=tax,
        precision=precision,
        info={"weights_origin": origin},
        step_key=key,
    )
    return _load_unless_converted(clf)


def _load_unless_converted(clf: Classifier) -> Classifier:
    """Load ``clf``'s model now unless a run on a CPU will not need it: float32, a step key, and its step
    converted and cached. Loading now is what surfaces a damaged or unsafe model file as a usage error before
    the run starts; a cached step means this very file was loaded and converted before."""
    from pipeline.models.lite import converted

    if not (clf.step_key and clf.precision == "float32" and not has_gpu() and converted(clf.step_digest())):
        clf.model  # noqa: B018 - read to load
    return clf


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
    from pipeline.models.card import CARD_FILE

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


def expected_preprocess(name: str) -> Preprocess:
    """The model input ``name`` will take, known before the model loads (its card, or ImageNet's 224 px
    for registered models): ``run`` cuts the first chunk's inputs with it while TensorFlow imports, and
    checks it against the loaded model. Raises what ``resolve_model`` and ``read_card`` raise."""
    ref = resolve_model(name)
    if isinstance(ref, Path):
        from pipeline.models.card import read_card

        return read_card(ref).preprocessing()
    return IMAGENET_224


def _card_classifier(folder: Path, precision: str) -> Classifier:
    """A model trained by ``labelcat train``: its card says labels, pixels and temperature."""
    from pipeline.models.backbones import file_sha256
    from pipeline.models.card import MODEL_FILE, load_model, read_card

    has_gpu()
    card = read_card(folder)

    def load():
        return at_precision(load_model(folder)[0], precision)

    file = folder / MODEL_FILE
    clf = Classifier(
        name=card.name,
        version=f"{card.arch}-{card.training_data.get('fingerprint', 'unknown')}-{card.created_at}",
        model=Deferred(load),
        preprocess=card.preprocessing(),
        categories=list(card.classes),
        temperature=float(card.temperature),
        precision=precision,
        info={"card": str(folder / "card.json"), "recommended_threshold": card.recommended_threshold,
              "open_set": card.open_set},
        # what the card says of the model's outputs is part of the key: an edited card is a new step
        step_key=(f"card:{file_sha256(file)}:{len(card.classes)}:{bool(card.imagenet_evidence)}"
                  if file.is_file() else None),
        evidence=load_taxonomy() if card.imagenet_evidence else None,
        evidence_ignored=frozenset((card.imagenet_evidence or {}).get("ignored", ())),
    )
    return _load_unless_converted(clf)


def at_precision(model, precision: str):
    """``model`` as ``precision`` ("mixed" or "float32", resolved) runs it."""
    return to_mixed_precision(model) if precision == "mixed" else model


#: Layers of a few-shot model that compute its logits without being an output themselves when the
#: taxonomy prior is added to them (``fewshot.build_model``): kept float32 under mixed precision.
FLOAT32_HEADS = frozenset({"logits", "taxonomy_prior"})


def to_mixed_precision(model):
    """Clone ``model`` with float16 compute (bfloat16 on CPUs) and float32 outputs.

    Mixed precision is a property each layer gets when it is built, so a model
    loaded in float32 has to be cloned layer by layer; the weights are copied
    and the layers that make the model's outputs stay float32 so softmax sees full-precision logits (a
    few-shot model's shop logits and its backbone's ImageNet logits alike, and the two heads a shop
    model's taxonomy prior adds together: ``FLOAT32_HEADS``).
    """
    import keras

    policy = "mixed_float16" if has_gpu() else "mixed_bfloat16"
    float32 = set(model.output_names) | FLOAT32_HEADS

    def clone(layer):
        config = layer.get_config()
        if layer.name not in float32 and not isinstance(layer, keras.layers.InputLayer):
            config["dtype"] = policy
        return layer.__class__.from_config(config)

    mixed = keras.models.clone_model(model, clone_function=clone)
    mixed.set_weights(model.get_weights())
    return mixed


