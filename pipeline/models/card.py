"""Model cards: every trained model is a folder with ``model.keras`` and ``card.json``.

Why a card: a model file alone does not say which labels its outputs are,
how to prepare pixels for it, what data it saw, how good it is or how far to
trust its confidences. ``run`` needs all of that to use a model, and a shop
needs it to decide whether to. Models are saved in the native ``.keras``
format and loaded with ``safe_mode=True``; Lambda layers (arbitrary code) are
refused when saving and loading, and nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.models.preprocess import Preprocess
from pipeline.ops.fsutil import current_umask

CARD_VERSION = "1"
MODEL_FILE = "model.keras"
CARD_FILE = "card.json"


class CardError(ValueError):
    """A model folder that cannot be used safely or is incomplete."""


@dataclass
class ModelCard:
    name: str
    classes: list[str]
    preprocess: dict
    arch: str
    backbone: str | None = None
    weights_origin: str | None = None
    training_data: dict = field(default_factory=dict)  # source, fingerprint, counts per split
    metrics: dict = field(default_factory=dict)  # validation/test metrics
    temperature: float = 1.0
    ece_before: float | None = None
    ece_after: float | None = None
    recommended_threshold: float | None = None
    training: dict = field(default_factory=dict)  # epochs, seconds, machine, phases
    library_versions: dict = field(default_factory=dict)
    created_at: str = ""
    card_version: str = CARD_VERSION
    open_set: dict | None = None  # few-shot models: unit class means and the similarity below which a photo is declined
    imagenet_evidence: dict | None = None  # few-shot models: the second output is the frozen backbone's ImageNet logits

    def preprocessing(self) -> Preprocess:
        return Preprocess.from_dict(self.preprocess)


def library_versions() -> dict[str, str]:
    """Versions that made the model; the Keras backend too (a model trained under JAX on a GPU
    machine has no TensorFlow there, and loads under TensorFlow here)."""
    from importlib import metadata

    import keras

    from pipeline import __version__

    versions = {"labelcat": __version__, "keras": keras.__version__, "keras_backend": keras.backend.backend()}
    for dist in ("tensorflow", "jax", "numpy", "pillow"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


def fingerprint(items: list[tuple[str, str]]) -> str:
    """Order-independent digest of (content sha256, label) pairs: which data a model saw."""
    h = hashlib.sha256()
    for digest, label in sorted(items):
        h.update(f"{digest}\t{label}\n".encode())
    return h.hexdigest()[:16]


def _check_no_lambda(model) -> None:
    import keras

    def walk(layer):
        if isinstance(layer, keras.layers.Lambda):
            raise CardError(f"layer {layer.name!r} is a Lambda layer (arbitrary code); not allowed in a model card")
        for sub in getattr(layer, "layers", []):
            walk(sub)

    walk(model)


MODEL_FOLDER_FILES = frozenset({"model.keras", "card.json"})


def check_model_destination(folder: str | Path, force: bool, protect: Path | None = None) -> None:
    """Refuse a destination labelcat must not replace: anything but a model folder, and a model folder without ``force``.

    ``protect`` (the training data) may be neither the destination, nor inside it, nor contain it
    (a model folder inside a class-folder tree would be read as a class the next time).
    """
    folder = Path(folder)
    if protect is not None and protect.exists():
        dest, data = folder.resolve(), protect.resolve()
        if dest == data or dest in data.parents or data in dest.parents:
            raise CardError(f"--out {folder} overlaps the training data {protect}; write the model elsewhere")
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise CardError(f"--out {folder} exists and is not a folder; refusing to replace it")
    if not folder.exists():
        return
    entries = {p.name for p in folder.iterdir()}
    if not entries:
        return
    if CARD_FILE not in entries or entries - MODEL_FOLDER_FILES:
        raise CardError(f"--out {folder} exists and is not a labelcat model folder (it holds "
                        f"{', '.join(sorted(entries)[:5])}); refusing to replace it")
    if not force:
        raise CardError(f"--out {folder} is an existing model; pass --force to replace it")


def _without_optimizer(model):
    """The same network and weights without the optimizer's state (AdamW's moments double a model's
    size twice over, and nothing that loads a card needs them: ``--init-from`` compiles afresh)."""
    import keras

    if getattr(model, "optimizer", None) is None:
        return model
    return keras.Model(model.inputs, model.outputs, name=model.name)  # the same layers, never compiled


def save_model(model, card: ModelCard, folder: str | Path, force: bool = False) -> Path:
    """Write ``folder/model.keras`` and ``folder/card.json`` atomically (whole folder).

    An existing folder is replaced only if it is a model folder and ``force``
    is set (``check_model_destination``); labelcat deletes nothing it did not make.
    """
    _check_no_lambda(model)
    folder = Path(folder)
    check_model_destination(folder, force)
    folder.parent.mkdir(parents=True, exist_ok=True)
    card.created_at = card.created_at or datetime.now(timezone.utc).isoformat(timespec="seconds")
    card.library_versions = card.library_versions or library_versions()
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 would hide the model from other users
    try:
        _without_optimizer(model).save(tmp / MODEL_FILE)
        (tmp / CARD_FILE).write_text(json.dumps(asdict(card), indent=2) + "\n", encoding="utf-8")
        old = None
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{os.getpid()}"
            folder.rename(old)
        tmp.rename(folder)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


def read_card(folder: str | Path) -> ModelCard:
    path = Path(folder) / CARD_FILE
    try:
        doc: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CardError(f"{folder}: no {CARD_FILE}; not a labelcat model folder") from None
    except json.JSONDecodeError as exc:
        raise CardError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise CardError(f"{path}: not a JSON object")
    known = set(ModelCard.__dataclass_fields__)
    missing = {"name", "classes", "preprocess", "arch"} - set(doc)
    if missing:
        raise CardError(f"{path}: missing {', '.join(sorted(missing))}")
    card = ModelCard(**{k: v for k, v in doc.items() if k in known})
    validate_card(card, path)
    return card


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def validate_card(card: ModelCard, path: Path) -> None:
    """Refuse a card whose fields would give nonsense labels or tracebacks later: one line naming the field.

    Why at load: a card is a file anyone can edit, and a run trusts it for
    every row (a temperature of 0 would make every confidence 1.0).
    """
    def bad(field_name: str, why: str) -> CardError:
        return CardError(f"{path}: field {field_name!r} {why}")

    if not isinstance(card.name, str):
        raise bad("name", "must be text")
    if not isinstance(card.classes, list) or not card.classes or not all(isinstance(c, str) and c.strip() for c in card.classes):
        raise bad("classes", "must be a non-empty list of class names")
    if len({c.strip().lower() for c in card.classes}) != len(card.classes):
        raise bad("classes", "has duplicate names")
    if not isinstance(card.preprocess, dict):
        raise bad("preprocess", "must be an object like {\"name\": \"center_crop\", \"size\": 224}")
    try:
        pre = Preprocess.from_dict(card.preprocess)
    except (ValueError, TypeError, KeyError) as exc:
        raise bad("preprocess", f"is not usable ({exc})") from None
    if not 8 <= pre.size <= 1024 or pre.resize_short < 0:
        raise bad("preprocess", f"size {pre.size} is out of range 8..1024")
    t = _number(card.temperature)
    if t is None or not 0.01 <= t <= 100:
        raise bad("temperature", f"must be a number in 0.01..100, not {card.temperature!r}")
    if card.recommended_threshold is not None:
        r = _number(card.recommended_threshold)
        if r is None or not 0 <= r <= 1:
            raise bad("recommended_threshold", f"must be a number in 0..1 or null, not {card.recommended_threshold!r}")
    for name in ("training_data", "metrics", "training", "library_versions"):
        if not isinstance(getattr(card, name), dict):
            raise bad(name, "must be an object")
    if card.open_set is not None:
        entry = card.open_set if isinstance(card.open_set, dict) else {}
        cents, t = entry.get("centroids"), _number(entry.get("min_similarity"))
        if (not isinstance(cents, list) or len(cents) != len(card.classes) or t is None or not -1 <= t <= 1
                or not all(isinstance(c, list) and c and len(c) == len(cents[0]) for c in cents)):
            raise bad("open_set", "must hold one centroid per class and a min_similarity in -1..1")


def load_model(folder: str | Path):
    """(keras model, card) from a model folder, loaded with ``safe_mode=True``."""
    import keras

    import pipeline.models.layers  # noqa: F401 - registers labelcat's own layers (few-shot heads use them)

    folder = Path(folder)
    card = read_card(folder)
    file = folder / MODEL_FILE
    if not file.is_file():
        raise CardError(f"{folder}: no {MODEL_FILE}")
    try:
        model = keras.models.load_model(file, safe_mode=True, compile=False)
    except ValueError as exc:  # safe_mode refuses lambdas / unsafe deserialisation
        raise CardError(f"{file}: refused by safe loading ({exc})") from None
    _check_no_lambda(model)
    if model.outputs[0].shape[-1] != len(card.classes):
        raise CardError(f"{folder}: model has {model.outputs[0].shape[-1]} outputs, card lists {len(card.classes)} classes")
    if len(model.outputs) != (2 if card.imagenet_evidence else 1) or (
            card.imagenet_evidence and model.outputs[1].shape[-1] != 1000):
        raise CardError(f"{folder}: model has {len(model.outputs)} outputs; its card "
                        + ("says the second is ImageNet's 1000 classes" if card.imagenet_evidence else "names one"))
    return model, card
