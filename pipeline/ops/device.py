"""Where the work runs: usable cores, whether TensorFlow sees a GPU, a quiet TensorFlow import.

Why here and not in the classifier: the runners size their thread pools and
training records its machine from the same probe, and both must be able to
ask without pulling in the model code.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

_GPU: bool | None = None


def cpu_count() -> int:
    """Cores this process may use (cgroup/affinity aware where the OS says)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def has_gpu() -> bool:
    """Whether TensorFlow sees a GPU; the first call imports TensorFlow.

    TensorFlow 2.21 prints absl INFO/ERROR lines (oneDNN notes, "could not find
    cuda drivers") before any log-level variable is read; they would land in
    every cron mail, so stderr is muted for the import and the device probe
    unless ``LABELCAT_TF_LOGS=1``.
    """
    global _GPU
    if _GPU is None:
        with muted_stderr(os.environ.get("LABELCAT_TF_LOGS") != "1"):
            import tensorflow as tf

            _GPU = bool(tf.config.list_physical_devices("GPU"))
    return _GPU


@contextlib.contextmanager
def muted_stderr(mute: bool) -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for the block (C++ libraries write there directly)."""
    if not mute:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
