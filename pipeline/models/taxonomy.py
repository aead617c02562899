"""Shop taxonomy: turn 1000 ImageNet probabilities into shop categories.

Why: an ImageNet network knows "jersey" and "running shoe", a shop knows
"tops" and "footwear". A small editable data file maps one onto the other so
the default model labels real product photos with no training, and groups of
classes that are never products (animals, vehicles, remote controls, circuit
boards, scenery) become evidence for the junk filter.

Confidence over shop categories is the ImageNet probability mass of each
category renormalised over all product categories, so it sums to one across
the shop's labels and is not a raw ImageNet score.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

DEFAULT_TAXONOMY = "taxonomy.json"


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names, in model output order."""
    text = resources.files("pipeline.data").joinpath("imagenet_classes.json").read_text("utf-8")
    return json.loads(text)["classes"]


def normalise_hint(text: str) -> str:
    """Folder names and hints compare case-, space- and separator-insensitively ("Camera_and_Photo" is
    "camera & photo"), so a shop's department names match the taxonomy's aliases as they are written."""
    words = text.lower().replace("_", " ").replace("-", " ").split()
    return " ".join("&" if w == "and" else w for w in words)


class TaxonomyError(ValueError):
    """The taxonomy file is malformed; raised with a message that names the entry."""


@dataclass
class Taxonomy:
    """Category names, the ImageNet→category matrices and the hint aliases."""

    name: str
    version: str
    categories: list[str]
    groups: list[str]  # not-product evidence groups
    product_matrix: np.ndarray  # (1000, len(categories)) of 0/1
    group_matrix: np.ndarray  # (1000, len(groups)) of 0/1
    aliases: dict[str, str] = field(default_factory=dict)  # normalised hint -> category
    digest: str = ""
    #: each category's department (``None``: in none), the categories a shop may file under one another
    departments: list[str | None] = field(default_factory=list)

    def resolve_hint(self, hint: str | None) -> str | None:
        """The category a ``category_hint`` names, or None when it names none we know."""
        if not hint:
            return None
        return self.aliases.get(normalise_hint(hint))

    def aggregate(self, imagenet_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return (category probs renormalised, raw product mass per row, group mass).

        ``imagenet_probs`` is (N, 1000). The renormalised category probabilities
        sum to one per row; the raw masses say how much ImageNet evidence there is
        for "some product" and for each not-product group.
        """
        cat_mass = imagenet_probs @ self.product_matrix
        group_mass = imagenet_probs @ self.group_matrix
        total = cat_mass.sum(axis=1, keepdims=True)
        probs = np.divide(cat_mass, total, out=np.full_like(cat_mass, 1.0 / cat_mass.shape[1]), where=total > 0)
        return probs, total[:, 0], group_mass


def _resolve_entry(entry: object, classes: list[str], first_names: dict[str, list[int]]) -> list[int]:
    if isinstance(entry, int) and not isinstance(entry, bool):
        if not 0 <= entry < len(classes):
            raise TaxonomyError(f"ImageNet index {entry} out of range")
        return [entry]
    if not isinstance(entry, str):
        raise TaxonomyError(f"ImageNet entry {entry!r} must be an index, a range or a name")
    if "-" in entry and all(p.strip().isdigit() for p in entry.split("-", 1)):
        lo, hi = (int(p) for p in entry.split("-", 1))
        if not 0 <= lo <= hi < len(classes):
            raise TaxonomyError(f"ImageNet range {entry!r} out of range")
        return list(range(lo, hi + 1))
    hits = [i for i, name in enumerate(classes) if name == entry] or first_names.get(entry, [])
    if len(hits) == 1:
        return hits
    if not hits:
        raise TaxonomyError(f"unknown ImageNet class {entry!r}")
    raise TaxonomyError(f"ImageNet name {entry!r} is ambiguous (indices {hits}); use an index")


def load_taxonomy(path: str | Path | None = None) -> Taxonomy:
    """Load and validate a taxonomy file (the packaged default when ``path`` is None)."""
    if path is None:
        raw = resources.files("pipeline.data").joinpath(DEFAULT_TAXONOMY).read_bytes()
        source = "default"
    else:
        raw = Path(path).read_bytes()
        source = str(path)
    try:
        doc = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TaxonomyError(f"{source}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("categories"), dict) or not doc["categories"]:
        raise TaxonomyError(f"{source}: needs a non-empty 'categories' object")

    classes = imagenet_classes()
    first_names: dict[str, list[int]] = {}
    for i, name in enumerate(classes):
        first_names.setdefault(name.split(",")[0].strip(), []).append(i)

    categories = list(doc["categories"])
    groups = list(doc.get("not_product", {}))
    product = np.zeros((len(classes), len(categories)), dtype=np.float32)
    group = np.zeros((len(classes), len(groups)), dtype=np.float32)
    owner: dict[int, str] = {}
    aliases: dict[str, str] = {}

    def claim(indices: list[int], who: str) -> None:
        for i in indices:
            if i in owner:
                raise TaxonomyError(f"{source}: ImageNet class {i} ({classes[i]!r}) is in both {owner[i]!r} and {who!r}")
            owner[i] = who

    for j, cat in enumerate(categories):
        spec = doc["categories"][cat]
        if not isinstance(spec, dict):
            raise TaxonomyError(f"{source}: category {cat!r} must be an object")
        for entry in spec.get("imagenet", []):
            try:
                idx = _resolve_entry(entry, classes, first_names)
            except TaxonomyError as exc:
                raise TaxonomyError(f"{source}: category {cat!r}: {exc}") from None
            claim(idx, cat)
            product[idx, j] = 1.0
        for alias in [cat, *spec.get("aliases", [])]:
            key = normalise_hint(alias)
            if aliases.get(key, cat) != cat:
                raise TaxonomyError(f"{source}: alias {alias!r} names both {aliases[key]!r} and {cat!r}")
            aliases[key] = cat
    for j, grp in enumerate(groups):
        for entry in doc["not_product"][grp]:
            try:
                idx = _resolve_entry(entry, classes, first_names)
            except TaxonomyError as exc:
                raise TaxonomyError(f"{source}: not_product group {grp!r}: {exc}") from None
            claim(idx, f"not_product:{grp}")
            group[idx, j] = 1.0

    department: dict[str, str] = {}
    if not isinstance(doc.get("departments", {}), dict):
        raise TaxonomyError(f"{source}: 'departments' must be an object of category lists")
    for dept, members in doc.get("departments", {}).items():
        if not isinstance(members, list):
            raise TaxonomyError(f"{source}: department {dept!r} must be a list of categories")
        for cat in members:
            if cat not in doc["categories"]:
                raise TaxonomyError(f"{source}: department {dept!r}: {cat!r} is not a category")
            if department.setdefault(cat, dept) != dept:
                raise TaxonomyError(f"{source}: category {cat!r} is in both departments {department[cat]!r} and {dept!r}")

    return Taxonomy(
        name=str(doc.get("name", Path(source).stem)),
        version=str(doc.get("version", "0")),
        categories=categories,
        groups=groups,
        product_matrix=product,
        group_matrix=group,
        aliases=aliases,
        digest=hashlib.sha256(raw).hexdigest()[:12],
        departments=[department.get(c) for c in categories],
    )
