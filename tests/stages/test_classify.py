"""The tf.data loop gives what the model gives, in order, and survives bad files."""

import numpy as np
import pytest
from PIL import Image

from conftest import product_photo, tiny_test
from pipeline.stages.decode import load_for_model
from pipeline.stages.classify import dataset, predict, top_k


@pytest.fixture()
def photos(tmp_path):
    paths = []
    for i in range(11):
        p = tmp_path / f"p{i}.jpg"
        product_photo((20 * i, 100, 200 - 10 * i), (300 + 10 * i, 280), seed=i).save(p)
        paths.append(p)
    return paths


def test_batched_pipeline_matches_the_model_image_by_image(tiny_classifier, photos):
    preds = predict(tiny_classifier, photos, batch_size=4)  # 11 = 4 + 4 + 3: a ragged last batch
    x = np.stack([load_for_model(p) for p in photos]).astype(np.float32)
    logits = tiny_classifier.model(x, training=False).numpy()
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    cats, _, _ = tiny_classifier.taxonomy.aggregate(expected)
    np.testing.assert_allclose(preds.probs, cats, rtol=1e-4, atol=1e-6)
    assert preds.errors == [None] * 11


def test_the_photo_loader_runs_without_the_autotuner(tiny_classifier, photos):
    # With AUTOTUNE, about every other iterator ended by waiting up to 20 s for the autotuner's next
    # wake-up (README, "Benchmark"); the loader's parallelism and prefetch are fixed instead.
    from pipeline.learning.train import photo_dataset

    for ds in (dataset(photos, tiny_classifier.preprocess, 4),
               photo_dataset(photos, np.zeros(len(photos)), tiny_classifier.preprocess, 4, shuffle=True, seed=0)):
        assert ds.options().autotune.enabled is False
    batches = list(dataset(photos, tiny_classifier.preprocess, 4))
    assert [int(i) for idx, _, _ in batches for i in idx] == list(range(11))


def test_a_file_that_breaks_between_scan_and_classify_is_an_error_row(tiny_classifier, photos):
    photos[3].write_bytes(b"gone bad")
    photos[5].unlink()
    preds = predict(tiny_classifier, photos, batch_size=4)
    assert preds.errors[3][0] == "not_an_image" and preds.errors[5][0] == "missing"
    assert preds.probs[3].sum() == 0 and preds.probs[4].sum() == pytest.approx(1.0, rel=1e-4)


def test_mixed_precision_agrees_with_float32(tiny_classifier, photos):
    mixed = tiny_test(precision="mixed")
    assert mixed.model.layers[2].dtype_policy.name.startswith("mixed_")
    assert mixed.model.layers[-1].dtype_policy.name == "float32"
    a = predict(tiny_classifier, photos, batch_size=8).probs
    b = predict(mixed, photos, batch_size=8).probs
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.9
    np.testing.assert_allclose(a, b, atol=0.05)


def test_top_k_orders_best_first():
    labels, scores = top_k(np.array([[0.1, 0.7, 0.2]]), ["a", "b", "c"], 2)
    assert labels == [["b", "c"]] and scores == [[pytest.approx(0.7), pytest.approx(0.2)]]


def test_an_unexpected_decoder_crash_is_one_error_row_not_a_failed_run(tiny_classifier, photos, monkeypatch):
    from pipeline.stages import decode

    real = decode.load_pixels

    def flaky(preprocess, path, max_pixels=None):
        if path.name == "p2.jpg":
            raise ZeroDivisionError("decoder bug")
        return real(preprocess, path)

    monkeypatch.setattr(decode, "load_pixels", flaky)
    preds = predict(tiny_classifier, photos, batch_size=4)
    assert preds.errors[2] == ("decode_failed", "ZeroDivisionError: decoder bug")
    assert all(e is None for i, e in enumerate(preds.errors) if i != 2)


def test_blank_photo_in_fashion_mnist_preprocessing(tmp_path):
    from pipeline.models.preprocess import FASHION_MNIST_28
    from pipeline.stages.decode import load_pixels

    p = tmp_path / "blank.png"
    Image.new("RGB", (100, 100), "white").save(p)
    assert load_pixels(FASHION_MNIST_28, p).shape == (28, 28, 1)
