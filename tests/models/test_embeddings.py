"""Tonight's most alike photos vote on the labels of photos with no folder (``embeddings.neighbour_votes``)."""

import numpy as np
import pytest

from pipeline.models.embeddings import neighbour_votes
from conftest import SAMPLE


def test_alike_photos_outvote_a_photo_s_own_mistake_and_unlike_ones_do_not():
    """Six photos of one kind and six of another: the one the model misread (its own probabilities say the
    other kind) takes its kind's label from its five alike neighbours; a photo unlike everything (negative
    similarity to all) keeps its own probabilities, and so does a failed decode's row of zeros."""
    rng = np.random.default_rng(0)
    a, b, lone = rng.normal(size=(3, 64))
    emb = np.concatenate([a + 0.3 * rng.normal(size=(6, 64)), b + 0.3 * rng.normal(size=(6, 64)),
                          [lone], np.zeros((1, 64))])
    probs = np.array([[0.9, 0.1, 0.0]] * 6 + [[0.1, 0.9, 0.0]] * 6 + [[0.2, 0.2, 0.6], [0.0, 0.0, 0.0]], np.float32)
    probs[0] = [0.3, 0.7, 0.0]  # misread
    out = neighbour_votes(probs, emb)
    assert out[0].argmax() == 0 and out[0, 0] > 0.5
    assert (out[1:6].argmax(1) == 0).all() and (out[6:12].argmax(1) == 1).all()
    assert np.allclose(out.sum(1)[:13], 1.0) and not out[13].any()
    assert np.array_equal(neighbour_votes(probs[:5], emb[:5]), probs[:5])  # too few photos to say what is alike


@pytest.mark.slow
def test_real_photos_vote_with_their_kind(real_classifier):
    """On real photos (the sample catalogue's hoodies, t-shirts, sneakers and cushions, and the astronaut): a
    hoodie whose own probabilities were made a hesitant wrong reading (footwear 0.5-0.6) gets tops back
    from the other tops; a confident one stands (half of each vote is the photo's own). The astronaut, alike
    to none of them, is no label for its neighbours to confirm: its own sports 0.71 ends under the review
    threshold (0.6), so a person sees it."""
    from pipeline.stages.classify import predict

    paths = sorted((SAMPLE / "images" / "hoodies").glob("cl_bogo0[1-4]_1.jpg")) + sorted(
        (SAMPLE / "images" / "t-shirts").glob("cl_boot0*_1.jpg")) + sorted(
        (SAMPLE / "images" / "sneakers").glob("sneakers_0*.jpg")) + [
        SAMPLE / "images" / "cushions" / "cuschion01.jpg", SAMPLE / "images" / "cushions" / "cuschion02.jpg",
        SAMPLE / "images" / "t-shirts" / "astronaut.jpg"]
    preds = predict(real_classifier, [str(p) for p in paths])
    cats = real_classifier.categories
    probs = preds.probs.copy()
    assert cats[int(probs[0].argmax())] == "tops"
    sneaker = probs[len(paths) - 4].copy()
    probs[0] = 0.6 * sneaker + 0.4 * probs[0]  # a hoodie read, hesitantly, as a sneaker
    assert cats[int(probs[0].argmax())] == "footwear"
    out = neighbour_votes(probs, preds.embeddings)
    assert cats[int(out[0].argmax())] == "tops"
    probs[0] = sneaker  # read as a sneaker, confidently
    assert cats[int(neighbour_votes(probs, preds.embeddings)[0].argmax())] == "footwear"
    astronaut = len(paths) - 1
    assert probs[astronaut].max() > 0.7 and out[astronaut].max() < 0.6
