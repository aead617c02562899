"""Filesystem helpers shared by stages: the cache folder and atomic writes.

Why atomic: cron may kill a run at any moment (reboot, OOM, timeout). Readers
of our outputs (the inventory system, the next night's run) must see either
the previous complete file or the new complete file, never a torn one. Writing
to a temporary file in the same folder and ``os.replace``-ing it gives exactly
that on POSIX filesystems.
"""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def cache_dir() -> Path:
    """Where converted weights are cached: ``$LABELCAT_CACHE`` or ``~/.cache/labelcat``."""
    base = os.environ.get("LABELCAT_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    ) / "labelcat"
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def current_umask() -> int:
    """The process umask (reading it means setting it; set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(dest: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success, rename it over ``dest``.

    On any exception the temporary file is removed and ``dest`` is untouched.
    The temporary name starts with a dot so globbing readers skip it, and ends
    with ``suffix`` for writers (Keras) that insist on an extension.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=".tmp" + suffix, dir=dest.parent)
    os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 would hide the file from other readers
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, dest)
        with contextlib.suppress(OSError):  # make the rename itself durable
            dir_fd = os.open(dest.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def sweep_temporaries(dest: Path) -> int:
    """Remove the temporaries a killed writer of ``dest`` left behind; returns how many.

    Only names ``atomic_path`` makes (``.<name>.<pid>.<random>.tmp...``) whose
    process is gone are touched: never another file, never a live writer's.
    """
    removed = 0
    for tmp in dest.parent.glob(f".{glob.escape(dest.name)}.*.tmp*"):
        pid_text = tmp.name[len(dest.name) + 2:].split(".", 1)[0]
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
