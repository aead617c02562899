"""The XNNPACK engine: the classify step converted to TensorFlow Lite computes what TensorFlow computes."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import product_photo, tiny_test
from pipeline.models import lite
from pipeline.models.classifier import Classifier
from pipeline.stages.classify import make_step, predict

REPO = Path(__file__).resolve().parents[2]


def _photos(tmp_path: Path, n: int = 6) -> list[Path]:
    paths = []
    for i in range(n):
        paths.append(tmp_path / f"p{i}.jpg")
        product_photo(((i * 40) % 255, 90, 160), seed=i).save(paths[-1])
    return paths


@pytest.mark.slow
def test_the_default_model_gives_the_same_labels_and_embeddings_on_both_engines(real_classifier):
    """Real photos through the real Lite0: probabilities within 1e-4, embeddings within 1e-3, same labels."""
    photos = sorted((REPO / "sample_catalog").rglob("*.jpg"))[:24]
    tf_run = predict(real_classifier, photos, engine="tensorflow")
    xnn_run = predict(real_classifier, photos, engine="xnnpack")
    assert real_classifier.info["engine"] == "xnnpack"
    assert np.abs(tf_run.probs - xnn_run.probs).max() < 1e-4
    assert np.abs(tf_run.embeddings - xnn_run.embeddings).max() < 1e-3
    assert (tf_run.probs.argmax(axis=1) == xnn_run.probs.argmax(axis=1)).all()
    assert tf_run.embeddings.shape == xnn_run.embeddings.shape == (len(photos), 1280)


def test_auto_runs_float32_on_xnnpack_and_mixed_precision_on_tensorflow(tiny_classifier):
    assert make_step(tiny_classifier) is make_step(tiny_classifier, engine="xnnpack")
    assert isinstance(make_step(tiny_classifier), lite.LiteStep)
    mixed = tiny_test(precision="mixed")
    assert not isinstance(make_step(mixed), lite.LiteStep)
    with pytest.raises(ValueError, match="engine"):
        make_step(tiny_classifier, engine="gpu")


def test_the_converted_step_is_cached_by_its_weights_and_reused(tmp_path, monkeypatch):
    clf = tiny_test()
    tf_step = make_step(clf, engine="tensorflow")
    x = np.random.default_rng(0).integers(0, 255, (3, 224, 224, 3), dtype=np.uint8)
    digest = lite.step_digest(clf.model, 1.0, (224, 224, 3))
    assert digest == lite.step_digest(tiny_test().model, 1.0, (224, 224, 3))  # the same weights: the same file
    assert digest != lite.step_digest(clf.model, 0.7, (224, 224, 3))  # a new temperature is a new step
    first = lite.lite_step(lambda: tf_step, digest, 1, 1000, cache=tmp_path)
    assert [f.name for f in tmp_path.iterdir()] == [f"step-{digest[:32]}.tflite"]
    monkeypatch.setattr(lite, "_convert", lambda step: pytest.fail("converted again although cached"))
    again = lite.lite_step(lambda: tf_step, digest, 1, 1000, cache=tmp_path)
    for probs, feats in (first(x), again(x)):
        assert np.abs(probs - tf_step(x)[0].numpy()).max() < 1e-5
        assert np.abs(feats - tf_step(x)[1].numpy()).max() < 1e-4
    assert again(x[:1])[0].shape == (1, 1000)  # a smaller last batch re-plans the interpreter


def test_a_damaged_cached_step_is_converted_again(tmp_path):
    clf = tiny_test()
    tf_step = make_step(clf, engine="tensorflow")
    digest = lite.step_digest(clf.model, 1.0, (224, 224, 3))
    (tmp_path / f"step-{digest[:32]}.tflite").write_bytes(b"TFL3 half a file")
    step = lite.lite_step(lambda: tf_step, digest, 1, 1000, cache=tmp_path)
    x = np.zeros((2, 224, 224, 3), np.uint8)
    assert np.abs(step(x)[0] - tf_step(x)[0].numpy()).max() < 1e-5
    assert (tmp_path / f"step-{digest[:32]}.tflite").stat().st_size > 1000


def test_a_model_tflite_cannot_express_keeps_the_tensorflow_step(tmp_path, monkeypatch):
    """The studies' SimpleRNN (TensorList ops): the run still works, on TensorFlow, and says so."""
    from pipeline.learning.archs import ARCHS
    from pipeline.models.preprocess import Preprocess

    monkeypatch.setenv("LABELCAT_CACHE", str(tmp_path / "cache"))
    rnn = Classifier("rnn", "v", ARCHS.get("simple_rnn")().build(3), Preprocess("fashion_mnist", 28),
                     ["a", "b", "c"])
    step = make_step(rnn)
    assert not isinstance(step, lite.LiteStep) and rnn.info["engine"] == "tensorflow (not convertible)"
    assert [f.stat().st_size for f in (tmp_path / "cache" / "lite").iterdir()] == [0]  # the refusal is cached
    photos = []
    for i in range(3):
        photos.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((28, 28), 60 * i, np.uint8)).save(photos[-1])
    preds = predict(rnn, photos)
    assert preds.probs.shape == (3, 3) and np.allclose(preds.probs.sum(axis=1), 1, atol=1e-5)


def test_a_quiet_run_writes_nothing_to_stderr_and_leaves_no_process(tmp_path, card_model):
    """Cron mails whatever a run prints: TensorFlow Lite's deprecation notice and XNNPACK's delegate line
    must not reach it, neither when the step is converted nor when it is loaded from the cache."""
    (tmp_path / "in").mkdir()
    _photos(tmp_path / "in", 3)
    env = {**os.environ, "LABELCAT_CACHE": str(tmp_path / "cache")}
    env.pop("LABELCAT_TF_LOGS", None)
    for night in (1, 2):
        run = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(tmp_path / "in"), "-o",
                                str(tmp_path / f"{night}.parquet"), "--model", str(card_model), "--quiet",
                                "--corrections", str(tmp_path / "corr"), "--log-file", str(tmp_path / "log.jsonl")],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
        stdout, stderr = run.communicate(timeout=300)
        assert run.returncode == 0 and stderr == "" and stdout == "", stderr[-2000:]
        # the quick exit (``cli.main``) stopped the scan's workers and their fork server: nothing is left behind
        for _ in range(50):
            try:
                os.killpg(run.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            pytest.fail("processes of the run are still alive after it exited")
        assert len(pd.read_parquet(tmp_path / f"{night}.parquet")) == 3
    assert len(list((tmp_path / "cache" / "lite").iterdir())) == 1
    events = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [e["engine"] for e in events if e["stage"] == "classify"] == ["xnnpack", "xnnpack"]  # for monitoring


def test_a_model_whose_step_is_cached_is_not_loaded_and_classifies_alike(tmp_path, monkeypatch, card_model):
    """Start-up: with its converted step cached, a model folder is read (card, file hash) but its Keras
    model is not loaded, and photos come out as from the loaded model; any change to the model file is a
    new key, so a damaged file is loaded, and refused, before the run starts, as it always was."""
    import shutil

    from pipeline.models.card import CardError
    from pipeline.models.classifier import load_classifier

    monkeypatch.setenv("LABELCAT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny"
    shutil.copytree(card_model, folder)
    photos = _photos(tmp_path)
    first = load_classifier(str(folder), precision="float32")
    assert first.loaded and first.step_key  # nothing converted yet: loaded now, as before
    converted = predict(first, photos)
    again = load_classifier(str(folder), precision="float32")
    assert not again.loaded
    cached = predict(again, photos)
    assert not again.loaded and again.info["engine"] == "xnnpack"
    assert np.array_equal(cached.probs, converted.probs) and np.array_equal(cached.embeddings, converted.embeddings)
    assert again.model.outputs[0].shape[-1] == 3 and again.loaded  # read on demand (a TensorFlow step, training)
    (folder / "model.keras").write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(CardError):
        load_classifier(str(folder), precision="float32")


def test_the_default_model_with_its_step_cached_is_not_loaded(tmp_path):
    """The default ImageNet model is known by its weights file's hash: a second process finds the step the
    first converted without building or loading Lite0, and labels the same photos the same."""
    _photos(tmp_path)
    code = ("import sys, numpy as np; from pathlib import Path; from pipeline.models.classifier import load_classifier; "
            "from pipeline.stages.classify import predict; "
            "c = load_classifier('efficientnet_lite0', precision='float32'); loaded = c.loaded; "
            "p = predict(c, sorted(Path(sys.argv[1]).glob('*.jpg'))); np.save(sys.argv[2], p.probs); "
            "print(loaded, c.loaded, c.info['engine'])")
    outs = []
    for night in (1, 2):
        done = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(tmp_path / f"{night}.npy")], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        outs.append(done.stdout.split())
    assert outs[1] == ["False", "False", "xnnpack"]  # whatever the first found in the shared cache
    assert np.array_equal(np.load(tmp_path / "1.npy"), np.load(tmp_path / "2.npy"))
