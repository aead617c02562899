"""Filter junk: photos that should not go into the catalogue, each with a reason.

Two families of checks. Quality checks need only pixels and run before the
model (a blank upload is not worth classifying, nor deduplicating: every
blank image hashes alike). Semantic checks need the model's opinion: the
photo shows no product at all (its ImageNet evidence is an animal, a remote
control, a circuit board...), or it confidently contradicts the folder or
hint it was filed under (the remote in the TV folder). Junk rows keep the
model's label and confidence so a reviewer can overrule the filter.

Default thresholds were chosen on sample_catalog (see README, "Junk rules").
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from PIL import Image

from pipeline.models.embeddings import leave_one_out_similarity, normalise

if TYPE_CHECKING:
    from pipeline.models.classifier import Classifier


@dataclass(frozen=True)
class JunkConfig:
    min_side: int = 64  # pixels; thumbnails and tracking pixels are smaller
    blank_std: float = 5.0  # greyscale standard deviation (0-255) below which a photo is blank
    max_aspect: float = 4.0  # banners and strips
    not_product: float = 0.4  # not-product group mass that makes a photo junk
    min_product_evidence: float = 0.3  # below this much product mass the photo shows no product we know
    mismatch_confidence: float = 0.85  # a confident contradiction of the hint...
    weak_evidence: float = 0.6  # ...or a contradiction with this little product evidence...
    hint_floor: float = 0.05  # ...while the hint's own category gets less than this
    ruled_out: float = 0.01  # ...or the hint's category gets less than this...
    ruled_out_winner: float = 0.5  # ...while another category gets at least this
    outlier_similarity: float = 0.10  # CL2N cosine to the other photos of its hint below which a photo is an outlier
    mismatch_alternative: float = 0.20  # a shop model's hint_mismatch needs its nearest class at least this alike
    outlier_min_group: int = 5  # a hint needs this many photos (tonight's and earlier) before one can be unlike the rest
    outlier_coherent: float = 0.30  # ...and its photos must agree this much (median similarity) to judge one
    outlier_reference: int = 200  # earlier photos kept per hint to judge tonight's against (the most recent)
    hint_trust: float = 0.9  # prior probability that a photo's folder or hint names its category (0: labels ignore hints)


@dataclass(frozen=True)
class Quality:
    """Pixel statistics behind the quality checks, written to the output."""

    pixel_std: float
    aspect_ratio: float


def quality_stats(img: Image.Image, grey: Image.Image | None = None) -> Quality:
    """Greyscale spread and long/short side ratio of an upright RGB image (``grey``: its ``convert("L")``,
    when the caller has it already)."""
    grey = grey if grey is not None else img.convert("L")
    # A box average by a whole factor (long side 128-255): the spread of a thumbnail, at a tenth of the cost of
    # a bicubic resize (which was the scan's fourth-largest step).
    factor = max(1, max(grey.size) // 128)
    small = grey.reduce(factor) if factor > 1 else grey
    std = float(np.asarray(small, dtype=np.float32).std())
    w, h = img.size
    return Quality(pixel_std=std, aspect_ratio=max(w, h) / max(1, min(w, h)))


def quality_reason(q: Quality, width: int, height: int, cfg: JunkConfig) -> str | None:
    """The first failed quality check as ``code: detail``, or None."""
    if min(width, height) < cfg.min_side:
        return f"too_small: {width}x{height} < {cfg.min_side} px"
    if q.pixel_std < cfg.blank_std:
        return f"near_blank: pixel std {q.pixel_std:.1f} < {cfg.blank_std}"
    if q.aspect_ratio > cfg.max_aspect:
        return f"extreme_aspect: {q.aspect_ratio:.1f}:1 > {cfg.max_aspect}:1"
    return None


def not_product_evidence(product_mass: float, group_mass: np.ndarray, groups: list[str],
                         cfg: JunkConfig) -> tuple[str, str] | None:
    """(what: a not-product group or ``no_product``, the junk reason) when ImageNet's evidence says the
    photo shows no product, or None (also when there is no evidence: a shop model without an ImageNet
    output)."""
    if not group_mass.size:
        return None
    g = int(group_mass.argmax())
    # Only when the photo is more not-product than product: a hard disc that also looks a little like a
    # circuit board, or a road bike a little like a vehicle, is a product of its category (aliases win).
    if group_mass[g] >= cfg.not_product and group_mass[g] >= product_mass:
        return groups[g], f"not_product: looks like {groups[g].replace('_', ' ')} ({group_mass[g]:.2f})"
    if product_mass < cfg.min_product_evidence:
        return "no_product", f"no_product: product evidence {product_mass:.2f} < {cfg.min_product_evidence}"
    return None


def semantic_reason(
    label: str,
    confidence: float,
    probs: np.ndarray,
    categories: list[str],
    product_mass: float,
    group_mass: np.ndarray,
    groups: list[str],
    hint_category: str | None,
    cfg: JunkConfig,
) -> str | None:
    """Why the model says this photo does not belong, or None."""
    evidence = not_product_evidence(product_mass, group_mass, groups, cfg)
    if evidence:
        return evidence[1]
    if hint_category and label != hint_category:
        p_hint = float(probs[categories.index(hint_category)])
        # A contradiction counts by both sides: a confident winner, weak product evidence, or a hinted
        # category the model all but rules out (an apple filed as footwear: footwear 0.00, food 0.70).
        if p_hint < cfg.hint_floor and (confidence >= cfg.mismatch_confidence or product_mass < cfg.weak_evidence
                                        or (p_hint < cfg.ruled_out and confidence >= cfg.ruled_out_winner)):
            return (
                f"hint_mismatch: filed as {hint_category} ({p_hint:.2f}) "
                f"but looks like {label} ({confidence:.2f})"
            )
    return None


@dataclass
class Catalogue:
    """The categories the shop sells, among a model's ``categories``: what labels may name.

    Why: the default model's label space is the taxonomy's 29 categories, and
    most of its zero-shot mistakes name one the shop does not sell (tweezers
    as ``office_books``, a running shoe as ``sports``, a tablet as
    ``appliances``). Knowing the photo shows one of the shop's categories is
    evidence, and Bayes' rule counts it (``sold_posterior``). ``fixed``: the
    categories a person named (``--catalogue``). Otherwise, when ``auto``, the
    categories the shop files its photos under (its folders or hint column,
    tonight's and earlier nights'), once there are two: a night of one folder
    says nothing about what else the shop sells. ``None`` where neither holds.
    """

    categories: list[str]
    fixed: frozenset[str] | None = None
    auto: bool = True
    seen: set[str] = field(default_factory=set)
    #: each category's department (the taxonomy's; ``None`` for a model without one): see ``files_under``
    departments: list[str | None] | None = None

    def add(self, category: str | None) -> None:
        """A category the shop filed a photo under (a hint's category; ``None`` for no usable hint)."""
        if category in self.categories:
            self.seen.add(category)

    def sold(self) -> np.ndarray | None:
        """A boolean mask over ``categories``, or None when labels may name any of them."""
        names = self.fixed if self.fixed is not None else self.seen if self.auto and len(self.seen) >= 2 else None
        return None if names is None else np.array([c in names for c in self.categories])


class CatalogueError(ValueError):
    """A ``--catalogue`` the model cannot use (a usage error: nothing was written)."""


def catalogue_for(classifier: Classifier, option: str) -> Catalogue:
    """The ``Catalogue`` a ``--catalogue`` option names, for ``run`` and ``evaluate`` alike: ``auto`` (the
    categories photos are filed under or labelled with, for the default model: a trained model's classes are
    the shop's already), ``all``, or names, each a model category or a folder name that maps to one
    (``Classifier.hint_category``)."""
    cats = list(classifier.categories)
    tax = classifier.taxonomy
    departments = tax.departments if tax is not None and tax.categories == cats and tax.departments else None
    if option == "auto":
        return Catalogue(cats, auto=tax is not None, departments=departments)
    if option == "all":
        return Catalogue(cats, auto=False)
    names = [n.strip() for n in option.split(",") if n.strip()]
    mapped = {n: classifier.hint_category(n) for n in names}
    unknown = [n for n, c in mapped.items() if c is None]
    if not names:
        raise CatalogueError("--catalogue names no category (auto, all, or categories separated by commas)")
    if unknown:
        raise CatalogueError(f"--catalogue: {', '.join(unknown)} is not a category of {classifier.name} "
                             f"(its categories: {', '.join(cats)})")
    return Catalogue(cats, fixed=frozenset(mapped.values()), departments=departments)


def files_under(probs: np.ndarray, hint: int, sold: np.ndarray, departments: list[str | None] | None,
                floor: float = JunkConfig.hint_floor) -> bool:
    """Whether a shop files this photo (``probs``: its category probabilities, the model's own), whose top
    category it does not sell, under its folder or hint ``hint`` (a category index; -1 for none), which it
    sells: the two share a department of the taxonomy, and no other category the shop sells there gets
    ``floor`` or more.

    Why: the taxonomy is finer than many shops. A shop that sells furniture and no ``home_decor`` files its
    lamps under furniture, and one that sells footwear and no ``underwear_swimwear`` its socks under
    footwear; calling such a photo ``not_sold`` junked a product of the shop's own folder. Only where the
    shop filed it so: without that folder a department is no evidence (a monument that ImageNet calls a
    pedestal is home_decor too). And only when the department holds nothing closer that the shop sells:
    a dress that ImageNet calls outerwear belongs in the shop's dresses folder, not its t-shirts'."""
    top = int(probs.argmax())
    if hint < 0 or not sold[hint] or sold[top] or not departments or departments[top] is None \
            or departments[top] != departments[hint]:
        return False
    return all(probs[s] < floor for s in np.flatnonzero(sold) if s != hint and departments[s] == departments[top])


def sold_posterior(probs: np.ndarray, sold: np.ndarray | None, departments: list[str | None] | None = None,
                   hints: np.ndarray | None = None) -> np.ndarray:
    """The category probabilities given that the photo shows something the shop sells: the model's, zero
    outside ``sold`` and renormalised (rows with no mass there, a failed decode's zeros, stay zero). A photo
    whose top category the shop files under its hint (``files_under``; ``hints``: each row's hint category
    index, -1 for none) keeps that category's probability there: the lamp in the furniture folder is
    furniture. Only the top category: a department's small shares would add up (a juice carton is a little
    pitcher, vase and soap dispenser)."""
    if sold is None or probs.ndim != 2 or not len(probs):
        return probs
    kept = np.where(sold, probs, 0.0)
    if departments and hints is not None:
        for r in np.flatnonzero(hints >= 0):
            if files_under(probs[r], int(hints[r]), sold, departments):
                kept[r, hints[r]] += probs[r].max()
    mass = kept.sum(axis=1, keepdims=True)
    return np.divide(kept, mass, out=np.zeros_like(kept), where=mass > 0).astype(probs.dtype)


def unsold_reason(probs: np.ndarray, sold: np.ndarray | None, categories: list[str], cfg: JunkConfig,
                  departments: list[str | None] | None = None, hint_category: str | None = None) -> str | None:
    """``not_sold`` when the model names a category the shop does not sell, nor files under the photo's
    folder (``files_under``), and gives the shop's own categories together less than the hint floor: a
    sneaker in a shop of TVs. As a contradicted hint (``semantic_reason``), it counts by both sides: a
    confident winner, or shop categories all but ruled out (an apple, food_drink 0.70, in a shop of shoes
    and furniture that get 0.004: renormalised, it would be a confident shoe). ``probs``: one photo's
    probabilities before ``sold_posterior`` (which would call it the least unlikely TV)."""
    if sold is None or not sold.any() or sold.all():
        return None
    mass = float(probs[sold].sum())
    other = int(np.where(sold, -1.0, probs).argmax())
    confident = (probs[other] >= cfg.mismatch_confidence
                 or (mass < cfg.ruled_out and probs[other] >= cfg.ruled_out_winner))
    hint = categories.index(hint_category) if hint_category in categories else -1
    if mass < cfg.hint_floor and confident and not files_under(probs, hint, sold, departments, cfg.hint_floor):
        return (f"not_sold: looks like {categories[other]} ({probs[other]:.2f}); "
                f"the shop's categories get {mass:.2f}")
    return None


def folded_note(probs: np.ndarray, label: str, sold: np.ndarray | None, categories: list[str],
                departments: list[str | None] | None, hint_category: str | None) -> str | None:
    """A review note for a kept photo labelled as its folder because the shop files its top category there
    (``files_under``; ``probs``: the model's, before ``sold_posterior``), or None: the lamp labelled
    furniture is kept, and a person confirms once that the shop files lamps there."""
    top = int(probs.argmax())
    if sold is None or label != hint_category or not files_under(probs, categories.index(label), sold, departments):
        return None
    return f"folded: looks like {categories[top]} ({probs[top]:.2f}), which the shop files under {label}"


def photo_reason(given: np.ndarray, probs: np.ndarray, sold: np.ndarray | None, categories: list[str],
                 product_mass: float, group_mass: np.ndarray, groups: list[str], hint_category: str | None,
                 cfg: JunkConfig, departments: list[str | None] | None = None) -> str | None:
    """What one photo's own model evidence says against it, or None: ``semantic_reason`` on ``given`` (its
    probabilities given the catalogue, ``sold_posterior``; the label and confidence are their top), then
    ``unsold_reason`` on ``probs`` (the model's own). One place, so the runner and the benches that
    measure it decide alike."""
    top = int(given.argmax())
    return (semantic_reason(categories[top], float(given[top]), given, categories, product_mass, group_mass, groups,
                            hint_category, cfg)
            or unsold_reason(probs, sold, categories, cfg, departments, hint_category))


def unfiled_hints(probs: np.ndarray, hints: list[str | None], hint_categories: list[str | None],
                  categories: list[str], product_mass: np.ndarray, group_mass: np.ndarray, groups: list[str],
                  cfg: JunkConfig) -> dict[str, tuple[int, int]]:
    """Folder names (or hint values) that name no category of the photos filed under them: {hint: (photos the
    model confidently places elsewhere, photos)} for each hint with ``outlier_min_group`` photos or more,
    most of which are products (``weak_evidence`` or more) of another category by ``mismatch_confidence``
    while the hint's gets under ``hint_floor``: the confident contradiction of ``semantic_reason``, on the
    model's own probabilities (a landscape, which contradicts a folder only weakly, counts as a photo).

    Why: the folder a photo sits in is its hint, and a shop's upload folder may be called ``home``,
    ``photo`` or ``video``, which are aliases of categories; every shirt and sneaker in it would then be
    junked as a contradiction of ``home_decor``. A category folder holds a few misfiled photos, not a
    majority; a folder most of whose photos the model confidently places elsewhere is not filed by
    category, so its name is no hint (the runner reads those photos as it reads photos without one).
    """
    counts: dict[str, list[int]] = {}
    for i, (hint, cat) in enumerate(zip(hints, hint_categories)):
        if hint is None or cat not in categories:
            continue
        top = int(probs[i].argmax())
        reason = semantic_reason(categories[top], float(probs[i, top]), probs[i], categories, float(product_mass[i]),
                                 group_mass[i], groups, cat, cfg)
        elsewhere = (reason is not None and reason.startswith("hint_mismatch")
                     and probs[i, top] >= cfg.mismatch_confidence and product_mass[i] >= cfg.weak_evidence)
        tally = counts.setdefault(hint, [0, 0])
        tally[0] += bool(elsewhere)
        tally[1] += 1
    return {h: (c, n) for h, (c, n) in counts.items() if n >= cfg.outlier_min_group and 2 * c > n}


def hint_posterior(probs: np.ndarray, hint: np.ndarray, trust: float, categories: int | None = None) -> np.ndarray:
    """The category probabilities once the photo's folder or hint is counted as evidence too.

    Why: the shop filed the tablet under ``computers``; the photo alone says
    ``appliances`` (ImageNet's "microwave") at 0.77 and ``computers`` at 0.12.
    Shops file far more reliably than a zero-shot ImageNet mapping labels, so
    Bayes' rule with a prior of ``trust`` on the hinted category (the rest
    shared evenly) picks ``computers``. It takes a photo that all but rules the
    hint out to win against it (at 0.9 over 29 categories, 252 to 1), and those
    are what ``semantic_reason`` junks. ``hint`` holds each row's category
    index, -1 where there is no usable hint; such rows are returned unchanged.
    ``categories``: how many categories the prior shares the rest over, when
    fewer than the columns are possible (the shop's catalogue, ``Catalogue``):
    ``trust`` stays the prior probability of the hinted one among them.
    """
    k = (categories or probs.shape[1]) if probs.ndim == 2 else 0
    rows = np.flatnonzero(np.asarray(hint) >= 0)
    if k < 2 or not rows.size or trust <= 1.0 / k:
        return probs
    weight = np.inf if trust >= 1.0 else trust * (k - 1) / (1.0 - trust)
    out = probs.astype(np.float64, copy=True)
    cols = np.asarray(hint)[rows]
    if np.isinf(weight):
        out[rows] = 0.0
        out[rows, cols] = 1.0
    else:
        out[rows, cols] *= weight
        total = out[rows].sum(axis=1, keepdims=True)
        out[rows] = np.divide(out[rows], total, out=np.zeros_like(out[rows]), where=total > 0)
    return out.astype(probs.dtype)


@dataclass
class HintReference:
    """Photos labelled earlier (earlier chunks, and earlier nights with ``--store``), by category hint.

    Why: a folder of three photos tonight is too small to call one of them
    unlike the others, but the shop filed forty TVs under ``tv`` last week;
    tonight's remote is judged against those too. Only the ``size`` most
    recent embeddings per hint are kept, so memory and the per-chunk cost
    stay bounded however long the history.
    """

    size: int = 200
    by_hint: dict[str, deque] = field(default_factory=dict)
    total: np.ndarray | None = None  # sum of every embedding added, hinted or not: the shop's mean photo
    count: int = 0

    def add(self, hint: str | None, embedding: np.ndarray | None) -> None:
        if embedding is None:
            return
        embedding = np.asarray(embedding, np.float64)
        if self.total is None or self.total.shape != embedding.shape:
            self.total, self.count = np.zeros_like(embedding), 0
        self.total += embedding
        self.count += 1
        if hint and self.size > 0:
            self.by_hint.setdefault(hint, deque(maxlen=self.size)).append(embedding.astype(np.float32))

    def for_hints(self, hints: list[str | None]) -> Reference:
        """The remembered photos filed under any of ``hints``, and the sum and count of all photos."""
        vecs: list[np.ndarray] = []
        names: list[str] = []
        for h in sorted({h for h in hints if h and h in self.by_hint}):
            vecs += self.by_hint[h]
            names += [h] * len(self.by_hint[h])
        return Reference(np.stack(vecs) if vecs else np.zeros((0, 0), np.float32), names, self.total, self.count)


class Reference(NamedTuple):
    """Earlier photos for ``hint_outliers``: some hints' embeddings, and every earlier photo's sum and count
    (so centring uses the shop's whole catalogue, not only the folders judged tonight)."""

    embeddings: np.ndarray
    hints: list[str]
    total: np.ndarray | None = None
    count: int = 0


class Likeness(NamedTuple):
    """How much a photo looks like the other photos of its folder, and who they are. ``nearest``: the folder is
    too mixed to have a typical photo, so ``similarity`` is to its most alike folder mate, not to their mean."""

    similarity: float
    others: str  # "the other 7 photos filed as shoes, 4 of them earlier"
    nearest: bool = False


def folder_likeness(embeddings: np.ndarray, hints: list[str | None], cfg: JunkConfig,
                    reference: Reference | None = None) -> dict[int, Likeness]:
    """Each photo's likeness to the other photos filed under the same hint, for the folders that can judge.

    The remote in the TV folder: no model class needs to cover it. Embeddings
    are centred on every photo known (tonight's and the ``reference``'s,
    photos labelled earlier: see ``HintReference``) and scaled to unit length;
    each of tonight's photos is compared with the mean of the *other* photos
    of its hint. Only hints with ``outlier_min_group`` photos are judged
    (smaller folders fall back to the model's evidence: no entry). A folder
    whose median similarity shows its photos agree (``outlier_coherent``) has
    a typical photo to compare with; a mixed one (a beauty folder of
    perfumes, lipsticks and brushes) has none, so there each photo is compared
    with its most alike folder mate instead (``Likeness.nearest``): a sneaker
    filed among the cosmetics is unlike every one of them.
    """
    if embeddings.ndim != 2 or embeddings.shape[1] == 0:
        return {}
    n = len(hints)
    x = embeddings.astype(np.float64)
    centre = x.mean(axis=0)
    if reference is not None and reference.count and reference.total.shape == centre.shape:
        centre = (x.sum(axis=0) + reference.total) / (n + reference.count)
        if len(reference.hints):
            x, hints = np.concatenate([x, reference.embeddings]), list(hints) + list(reference.hints)
    if len(hints) < cfg.outlier_min_group:
        return {}
    names = sorted({h for h in hints if h})
    position = {h: g for g, h in enumerate(names)}
    groups = np.array([position.get(h, -1) if h else -1 for h in hints])
    similarity = leave_one_out_similarity(x, groups, centre)
    out: dict[int, Likeness] = {}
    for g, hint in enumerate(names):
        idx = np.flatnonzero(groups == g)
        if len(idx) < cfg.outlier_min_group:
            continue
        sim, nearest = similarity[idx], False
        if float(np.median(sim)) < cfg.outlier_coherent:
            sim, nearest = _nearest_mate(normalise(x[idx], centre)), True
        earlier = int((idx >= n).sum())
        others = (f"{'each of ' if nearest else ''}the other {len(idx) - 1} photos filed as {hint}"
                  + (f", {earlier} of them earlier" if earlier else ""))
        out.update({int(i): Likeness(float(s), others, nearest) for i, s in zip(idx, sim) if i < n})
    return out


def _nearest_mate(z: np.ndarray, block: int = 1024) -> np.ndarray:
    """Each unit row's cosine to the most alike *other* row, in blocks of rows (a folder of thousands stays a
    few MB at a time)."""
    z = z.astype(np.float32)
    out = np.empty(len(z), np.float32)
    for start in range(0, len(z), block):
        sims = z[start:start + block] @ z.T
        sims[np.arange(len(sims)), np.arange(start, start + len(sims))] = -np.inf
        out[start:start + block] = sims.max(axis=1)
    return out


def folder_verdict(reason: str | None, likeness: Likeness | None, label: str, hint_category: str | None,
                   cfg: JunkConfig) -> tuple[str | None, str | None]:
    """(junk reason, review note) once the photo's folder has had its say on the model's ``reason``.

    - A photo unlike the other photos of its folder (``outlier_similarity``) is junk ``hint_outlier`` when
      the model's ``label`` disagrees with the folder too; when the model agrees (the shop's deliberate
      "espresso filed under drinks"), a person is shown it instead.
    - A ``hint_mismatch`` (or ``not_sold``: the same contradiction by a category the shop does not sell) is
      overruled when the photo is as like its folder's other photos as they are like each other
      (``outlier_coherent``): a sneaker shot from the sole, which ImageNet calls a knee pad with
      footwear at 0.00, still looks like the other sneakers, while a product misfiled in another category's
      folder or a non-product does not (none of the bench's development photos reaches 0.30 there). It
      is kept, labelled as the photo and its folder say together (``hint_posterior``), and shown to a
      person. Only a coherent folder's typical photo vouches: in a
      mixed folder (``Likeness.nearest``), two misfiled photos of one kind would vouch for each other.
    """
    if (reason and reason.startswith(("hint_mismatch", "not_sold")) and likeness and not likeness.nearest
            and likeness.similarity >= cfg.outlier_coherent):
        return None, (f"hint_vouched: {reason.split(': ', 1)[1]}; like {likeness.others} "
                      f"(similarity {likeness.similarity:.2f})")
    if reason or likeness is None or likeness.similarity >= cfg.outlier_similarity:
        return reason, None
    outlier = (f"hint_outlier: unlike {likeness.others} ({'most alike ' if likeness.nearest else 'similarity '}"
               f"{likeness.similarity:.2f} < {cfg.outlier_similarity})")
    if hint_category is not None and label != hint_category:
        return outlier, None
    return None, outlier


def open_set_reason(embedding: np.ndarray, open_set: dict | None, categories: list[str], label: str | None,
                    hint_category: str | None, cfg: JunkConfig) -> str | None:
    """A trained few-shot model's own evidence against a photo, or None.

    ``unknown``: the photo is far from every class the model knows (below the
    card's ``min_similarity``). ``hint_mismatch``: it is filed under a class it
    is unlike (similarity below ``outlier_similarity``) while the model's
    nearest class is another one, and one it is like (``mismatch_alternative``):
    the cat in the shoe folder, which a softmax would otherwise call
    confidently whichever class it is least unlike. Why the alternative: a
    photo unlike every class says only that the model has not seen its kind,
    which is what a few photos of a broad class (a multimeter among tools
    trained on hammers and pliers) look like too; the card's ``min_similarity``
    and the ImageNet evidence judge those, and folder mates may flag them.
    ``embedding`` is what the logits layer reads (centred, unit length).
    """
    if not open_set or embedding.size == 0:
        return None
    cents = np.asarray(open_set["centroids"], dtype=np.float32)
    if cents.shape[1] != embedding.shape[0]:
        return None
    sims = cents @ embedding
    best = int(sims.argmax())
    if sims[best] < float(open_set["min_similarity"]):
        return (f"unknown: nearest class {categories[best]} at similarity {sims[best]:.2f} "
                f"< {float(open_set['min_similarity']):.2f}")
    if hint_category in categories and label != hint_category:
        s_hint = float(sims[categories.index(hint_category)])
        if s_hint < cfg.outlier_similarity and sims[best] >= cfg.mismatch_alternative:
            return (f"hint_mismatch: filed as {hint_category} but unlike its photos (similarity {s_hint:.2f}); "
                    f"nearest class {categories[best]} ({sims[best]:.2f})")
    return None
