import pickle

import numpy as np
import pytest

from pipeline.models.backbones import lite0_weights_file
from pipeline.models.torchpickle import UnsafePickleError, load_state_dict


def test_reads_the_shipped_lite0_weights():
    state = load_state_dict(lite0_weights_file())
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert state["_fc.weight"].dtype == np.float32
    assert sum(k.endswith("_depthwise_conv.weight") for k in state) == 16
    assert np.isfinite(state["_bn1.running_var"]).all() and (state["_bn1.running_var"] > 0).all()


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def _legacy_file(tmp_path, obj):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        for part in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}, obj, []):
            pickle.dump(part, fh, protocol=2)
    return path


def test_refuses_code_execution(tmp_path):
    with pytest.raises(UnsafePickleError, match="posix.system|os.system"):
        load_state_dict(_legacy_file(tmp_path, {"w": _Evil()}))


def test_refuses_other_formats(tmp_path):
    zipped = tmp_path / "new.pth"
    zipped.write_bytes(b"PK\x03\x04rest")
    with pytest.raises(ValueError, match="zip-format"):
        load_state_dict(zipped)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(pickle.dumps(123))
    with pytest.raises(ValueError, match="magic"):
        load_state_dict(bad)
