"""The CPU engine: a classifier's compiled step converted to TensorFlow Lite and run by XNNPACK.

Why: on a CPU, TensorFlow's graph executor runs EfficientNet-Lite0's depthwise
convolutions at about half the rate of XNNPACK, the CPU kernels of TensorFlow
Lite that ship inside the tensorflow wheel (2 slow cores: 140-180 photos/s
against 67-110, outputs equal within 1e-6). The step converted is the very
``tf.function`` the classify stage compiles (uint8 pixels → tempered softmax and
embedding), so both engines compute the same thing. Converting takes seconds,
so the flatbuffer is cached by a digest of the weights and the step's
constants; later runs load it in milliseconds and skip tracing the step.
Models whose ops TensorFlow Lite's builtins lack (the studies' SimpleRNN and
BiLSTM) keep the TensorFlow step.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.ops.device import muted_stderr
from pipeline.ops.fsutil import atomic_path, cache_dir

# Bumped when the conversion changes, so cached flatbuffers from older code are not reused.
CONVERSION = 1


class LiteStep:
    """A converted step with the TensorFlow step's call shape: a uint8 batch → (probabilities, embeddings).

    One interpreter per step; calls are serialised (an interpreter is not
    re-entrant) and it is re-planned only when the batch size changes (the last
    batch of a run).
    """

    def __init__(self, flatbuffer: bytes, threads: int, n_out: int, outputs: int = 2) -> None:
        import tensorflow as tf

        # tf.lite.Interpreter's deprecation notice and XNNPACK's "Created delegate" line (printed by the
        # first allocation) would reach cron mail
        with warnings.catch_warnings(), muted_stderr(os.environ.get("LABELCAT_TF_LOGS") != "1"):
            warnings.simplefilter("ignore")
            self._interpreter = tf.lite.Interpreter(model_content=flatbuffer, num_threads=threads)
            self._interpreter.allocate_tensors()
        self.threads = threads
        self._input = self._interpreter.get_input_details()[0]["index"]
        # outputs are named after the step's flat outputs (Identity, Identity_1, ...): probabilities,
        # embeddings, and a shop model's ImageNet probabilities
        found = sorted(self._interpreter.get_output_details(), key=lambda d: (len(d["name"]), d["name"]))
        if len(found) != outputs or found[0]["shape_signature"][-1] != n_out:
            raise ValueError(f"converted step's outputs {[(d['name'], d['shape_signature']) for d in found]} "
                             f"are not ({n_out} probabilities, embedding{', ImageNet' if outputs == 3 else ''})")
        self._outputs = [d["index"] for d in found]
        self._batch = -1
        self._lock = threading.Lock()

    def __call__(self, pixels) -> tuple[np.ndarray, ...]:
        x = np.ascontiguousarray(pixels, dtype=np.uint8)
        with self._lock:
            if x.shape[0] != self._batch:
                self._interpreter.resize_tensor_input(self._input, list(x.shape))
                self._interpreter.allocate_tensors()
                self._batch = x.shape[0]
            self._interpreter.set_tensor(self._input, x)
            self._interpreter.invoke()
            return tuple(self._interpreter.get_tensor(i).copy() for i in self._outputs)


def _digest(temperature: float, shape: tuple[int, ...]):
    """The hash both digests start from: the converter, the libraries that trace the step, its constants."""
    import tensorflow as tf

    import keras

    return hashlib.sha256(f"{CONVERSION}|{tf.__version__}|{keras.__version__}|{temperature!r}|{tuple(shape)}|".encode())


def step_digest(model, temperature: float, shape: tuple[int, ...]) -> str:
    """What the converted step depends on: the weights, the temperature, the input shape, the converter."""
    h = _digest(temperature, shape)
    for i, w in enumerate(model.weights):  # by position: Keras' layer names vary with what else the process built
        value = np.ascontiguousarray(w.numpy())
        h.update(f"{i}:{value.dtype}:{value.shape}|".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def key_digest(key: str, temperature: float, shape: tuple[int, ...]) -> str:
    """``step_digest`` from the model's source instead of its loaded weights: ``key`` names the files the
    model is loaded from by their sha256 (``Classifier.step_key``), so the cached step is found before, and
    without, loading the model."""
    h = _digest(temperature, shape)
    h.update(f"source:{key}".encode())
    return h.hexdigest()


def _step_path(digest: str, cache: Path | None = None) -> Path:
    return (cache or cache_dir() / "lite") / f"step-{digest[:32]}.tflite"


def converted(digest: str, cache: Path | None = None) -> bool:
    """Whether a converted step for ``digest`` is cached (a refusal, cached as an empty file, is not one)."""
    try:
        return _step_path(digest, cache).stat().st_size > 0
    except OSError:
        return False


def lite_step(build: Callable[[], Any], digest: str, threads: int, n_out: int,
              cache: Path | None = None, outputs: int = 2) -> LiteStep | None:
    """The cached or freshly converted engine for the TensorFlow step ``build()`` returns (called only to
    convert), or ``None`` when TensorFlow Lite cannot express the model (then the caller keeps the
    TensorFlow step; the refusal is cached too, as an empty file)."""
    path = _step_path(digest, cache)
    if path.exists():
        try:
            blob = path.read_bytes()
            return LiteStep(blob, threads, n_out, outputs) if blob else None
        except (OSError, ValueError, RuntimeError):  # damaged (a full disk, a hand edit): converted again below
            pass
    blob = _convert(build())
    with atomic_path(path, suffix=".tflite") as tmp:
        tmp.write_bytes(blob)
    return LiteStep(blob, threads, n_out, outputs) if blob else None


def _convert(tf_step) -> bytes:
    """The flatbuffer of ``tf_step`` with TensorFlow Lite's builtin ops only, or ``b""`` when it needs others."""
    import tensorflow as tf
    from tensorflow.lite.python.convert_phase import ConverterError

    converter = tf.lite.TFLiteConverter.from_concrete_functions([tf_step.get_concrete_function()], tf_step)
    with warnings.catch_warnings(), muted_stderr(os.environ.get("LABELCAT_TF_LOGS") != "1"):
        warnings.simplefilter("ignore")
        try:
            return converter.convert()
        except ConverterError:
            return b""
