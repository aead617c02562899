"""The copy check after the model: the embeddings propose, the aligned check confirms, the walk decides."""

import numpy as np
import pytest
from PIL import Image

from build import sale_badge as logo
from conftest import SAMPLE, hue_turn, jpeg_copy
from pipeline.stages.classify import predict
from pipeline.stages.copies import EMBED_DIM, EmbeddingIndex, Photo, categories_of, classified_photos, find_copies, project
from pipeline.stages.decode import decode
from pipeline.stages.dedupe import Candidate, DedupeConfig, compute_hashes, find_duplicates


def photos_of(images: list[Image.Image], classifier, tmp_path) -> list[Photo]:
    """``Photo``s keyed 0..n-1 with the real model's features and top category, as the runner builds them."""
    paths = []
    for i, img in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        img.save(paths[-1])
    preds = predict(classifier, paths)
    return classified_photos(range(len(images)), [img.width * img.height for img in images],
                             [compute_hashes(img).thumb for img in images], preds.probs, preds.embeddings,
                             classifier.categories, [100] * len(paths))  # PNG files: lossless


LOGO_COPIES = ["beer/beer-01_1.jpg", "cushions/cuschion01.jpg", "juices/fd_juice_01.jpg", "paints/paints_03.jpg",
               "sneakers/sneakers_01_1.jpg", "t-shirts/cl_boot03_1.jpg", "wine/wine-red.jpg"]


def test_logo_copies_the_hashes_miss_are_found_after_the_model(real_classifier, tmp_path):
    """Real photos with a 'SALE' badge over 8% of them: no hash, not even the whole photo's, comes within
    the search radius, so dedupe classifies them as products of their own; the copy check joins each to its
    original. The same badge copy recoloured (hue turned 60°, or greyscale) stays another article."""
    originals = [decode((SAMPLE / "images" / name).read_bytes()) for name in LOGO_COPIES]
    copies = [jpeg_copy(logo(img), 90) for img in originals]
    n = len(originals)
    for i in range(n):
        cands = [Candidate(0, "a", originals[i].width * originals[i].height, compute_hashes(originals[i])),
                 Candidate(1, "b", copies[i].width * copies[i].height, compute_hashes(copies[i]))]
        assert find_duplicates(cands) == {}, LOGO_COPIES[i]
    variants = [jpeg_copy(hue_turn(c, 60), 90) for c in copies] + [jpeg_copy(c.convert("L").convert("RGB"), 90)
                                                                    for c in copies]
    photos = photos_of(originals + copies + variants, real_classifier, tmp_path)
    found = find_copies(photos[:2 * n], EmbeddingIndex())
    assert {row: m.kept for row, m in found.items()} == {n + i: i for i in range(n)}
    assert all(m.kind == "near" for m in found.values())
    for v in range(2 * n, 4 * n):
        assert find_copies([photos[v % n], photos[v]], EmbeddingIndex()) == {}, (LOGO_COPIES[v % n], v >= 3 * n)


def test_same_design_products_are_not_copies(real_classifier, tmp_path):
    """Saleor's juice bottles, hoodies and t-shirts are one render with another label or colour: their
    features are close (the candidates exist), the aligned check keeps every one apart."""
    names = ["juices/fd_juice_01.jpg", "juices/fd_juice_02.jpg", "juices/fd_juice_03.jpg", "juices/fd_juice_05.jpg",
             "juices/fd_juice_06.jpg", "hoodies/cl_bogo01_1.jpg", "hoodies/cl_bogo02_1.jpg", "hoodies/cl_bogo03_1.jpg",
             "hoodies/cl_bogo04_1.jpg", "t-shirts/cl_boot01_1.jpg", "t-shirts/cl_boot03_1.jpg",
             "t-shirts/cl_boot06_1.jpg", "t-shirts/cl_boot07_1.jpg"]
    photos = photos_of([decode((SAMPLE / "images" / n).read_bytes()) for n in names], real_classifier, tmp_path)
    vectors = project(np.stack([p.features for p in photos])).astype(np.float32)
    sims = vectors @ vectors.T
    assert (sims[np.triu_indices(len(names), 1)] >= DedupeConfig().embedding_similarity).sum() >= 10
    assert find_copies(photos, EmbeddingIndex()) == {}


def _twins() -> tuple[np.ndarray, np.ndarray]:
    """Thumbnails of a real photo and of its badge copy (the aligned check passes them)."""
    img = decode((SAMPLE / "images" / "beer/beer-01_1.jpg").read_bytes())
    return compute_hashes(img).thumb, compute_hashes(jpeg_copy(logo(img), 90)).thumb


def test_the_walk_keeps_the_largest_and_what_earlier_nights_kept():
    """The rule of ``find_duplicates``: tonight the photo with the most pixels is kept (ties: the better
    encoding, then the lower key);
    a photo kept on an earlier night stays kept even when tonight's copy is larger; photos whose two most
    likely categories have none in common, or whose features are apart, are never compared."""
    a, b = _twins()
    same = np.ones(1280, np.float32)
    tonight = [Photo(0, 100, "food_drink", same, a), Photo(1, 400, "food_drink", same, b)]
    assert {r: m.kept for r, m in find_copies(tonight).items()} == {0: 1}
    assert {r: m.kept for r, m in find_copies([Photo(5, 100, "x", same, a), Photo(3, 100, "x", same, b)]).items()} == {5: 3}
    # as many pixels: the better encoding is kept, as before the model (``find_duplicates``)
    assert {r: m.kept for r, m in find_copies([Photo(5, 100, "x", same, a, fidelity=90),
                                               Photo(3, 100, "x", same, b, fidelity=35)]).items()} == {3: 5}
    history = EmbeddingIndex()
    history.add(Photo(-7, 0, "food_drink", (same * 40).astype(np.int8), a))  # int8 codes, as the store keeps them
    assert len(history) == 1
    assert {r: m.kept for r, m in find_copies(tonight, history).items()} == {0: -7, 1: -7}
    assert find_copies([Photo(0, 100, "food_drink", same, a), Photo(1, 400, "tops", same, b)]) == {}
    # ...unless they share one of their two most likely categories, whichever it is first for: tonight, in
    # the history, and with the categories in either photo's second place (the walk still keeps the largest)
    for small, large in ((("food_drink", "tops"), ("tops",)), (("food_drink",), ("tops", "food_drink")),
                         (("food_drink", "shoes"), ("tops", "shoes"))):
        split = [Photo(0, 100, small[0], same, a, small[1:]), Photo(1, 400, large[0], same, b, large[1:])]
        assert {r: m.kept for r, m in find_copies(split).items()} == {0: 1}, (small, large)
        history = EmbeddingIndex()
        history.add(Photo(-7, 0, large[0], same, b, large[1:]))
        assert {r: m.kept for r, m in find_copies([split[0]], history).items()} == {0: -7}, (small, large)
    assert find_copies([Photo(0, 100, "food_drink", same, a, ("shoes",)), Photo(1, 400, "tops", same, b, ("bags",))]) == {}
    assert categories_of(np.array([[0.1, 0.7, 0.2]]), ["a", "b", "c"]) == [("b", ("c",))]
    apart = np.zeros(1280, np.float32)
    apart[0] = 1.0
    assert find_copies([Photo(0, 100, "food_drink", apart, a), Photo(1, 400, "food_drink", same, b)]) == {}
    assert find_copies(tonight, cfg=DedupeConfig(embedding_similarity=1.5)) == {}  # switched off


def test_the_walk_tries_the_most_similar_kept_photo_first():
    a, b = _twins()
    near, nearer = np.ones(EMBED_DIM, np.float32), np.ones(EMBED_DIM, np.float32)
    near[:8] = 0.0
    index = EmbeddingIndex()
    index.add(Photo(-2, 0, "c", near, a))
    index.add(Photo(-9, 0, "c", nearer, a))
    assert find_copies([Photo(0, 1, "c", nearer, b)], index)[0].kept == -9
    index.add(Photo(-1, 0, "c", nearer, a))  # packed into a second segment; equal similarity: the lower key
    assert find_copies([Photo(0, 1, "c", nearer, b)], index)[0].kept == -9


@pytest.mark.parametrize("dim", [64, 1280])
def test_projection_keeps_cosines_and_is_the_same_every_night(dim):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, dim)).astype(np.float32)
    y = x + 0.3 * rng.standard_normal(x.shape).astype(np.float32)
    p, q = project(x).astype(np.float32), project(y).astype(np.float32)
    assert p.shape == (50, min(dim, EMBED_DIM)) and project(x).dtype == np.float16
    assert np.allclose(np.linalg.norm(p, axis=1), 1.0, atol=1e-3)
    true = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    assert np.abs((p * q).sum(1) - true).max() < 0.1
    assert np.array_equal(project(x), project(x.copy()))


def test_a_design_in_many_colourways_sends_only_its_nearest_to_the_aligned_check():
    """Features do not see colour: forty kept photos of other articles all alike to tonight's photo. Only the
    ``COPY_CANDIDATES`` most similar are compared, so the original is found when it ranks among them and
    missed (a second classification, never a wrong merge) when it does not."""
    from pipeline.stages.copies import COPY_CANDIDATES

    a, b = _twins()
    other = decode((SAMPLE / "images" / "wine/wine-red.jpg").read_bytes())
    other_thumb = compute_hashes(other).thumb
    base = np.zeros(EMBED_DIM, np.float32)
    base[0] = 1.0

    def alike(cos: float) -> np.ndarray:
        v = base.copy()
        v[1] = np.sqrt(1 - cos ** 2) / cos
        return v

    for rank, expected in ((COPY_CANDIDATES - 1, {0: -1}), (COPY_CANDIDATES + 1, {})):
        index = EmbeddingIndex()
        for k in range(40):
            index.add(Photo(-2 - k, 0, "c", alike(0.999 - 0.001 * (k + (k >= rank))), other_thumb))
        index.add(Photo(-1, 0, "c", alike(0.999 - 0.001 * rank), a))
        assert {r: m.kept for r, m in find_copies([Photo(0, 1, "c", base, b)], index).items()} == expected
