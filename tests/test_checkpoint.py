"""Reading real and ultralytics-like checkpoints, and refusing everything else without running it."""

from __future__ import annotations

import os
import pickle
import zipfile

import pytest
import torch

from edgeyolo.errors import EdgeYoloError
from edgeyolo.model import load_checkpoint, save_checkpoint
from edgeyolo.model.weights import resolve_weights
from ultralytics_like import random_model, save_ultralytics_like, yaml_p6, yaml_v5_focus, yaml_v6


def test_reads_the_real_yolov5n(yolov5n_pt):
    ckpt = load_checkpoint(yolov5n_pt)
    model = ckpt.model
    assert ckpt.original_dtype == "float16"
    assert ckpt.names[:3] == ["person", "bicycle", "car"] and len(ckpt.names) == 80
    assert model.stride.tolist() == [8.0, 16.0, 32.0]
    assert model.describe()["anchors"][0] == [10.0, 13.0, 16.0, 30.0, 33.0, 23.0]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.eps == pytest.approx(1e-3) for m in bns)  # taken from the pickle, not torch's default


@pytest.mark.parametrize(
    "cfg, levels",
    [
        (yaml_v6(nc=80, depth=0.33, width=0.50), 3),  # yolov5s
        (yaml_v6(nc=3, depth=0.67, width=0.75), 3),  # yolov5m shape, custom classes
        (yaml_p6(nc=80), 4),  # yolov5n6
        (yaml_v5_focus(nc=7), 3),  # pre-v6 Focus/SPP, LeakyReLU
    ],
    ids=["s", "m-custom-nc", "n6-P6", "v5-focus"],
)
def test_ultralytics_like_checkpoints_round_trip(tmp_path, cfg, levels):
    original = random_model(cfg)
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        expected = original(x)
    path = save_ultralytics_like(random_model(cfg), tmp_path / "custom.pt", half=False, key="ema")
    loaded = load_checkpoint(path)
    assert loaded.model.detect.nl == levels
    assert loaded.model.detect.nc == cfg["nc"]
    assert loaded.names == [f"thing{i}" for i in range(cfg["nc"])]
    with torch.no_grad():
        got = loaded.model(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)
    if "activation" in cfg:
        assert isinstance(loaded.model.model[1].act, torch.nn.LeakyReLU)


def test_own_format_round_trip(tmp_path, yolov5n_pt):
    ckpt = load_checkpoint(yolov5n_pt)
    path = save_checkpoint(ckpt.model, tmp_path / "mine.pt")
    again = load_checkpoint(path)
    assert again.names == ckpt.names
    x = torch.rand(1, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(again.model(x), ckpt.model(x))


class _Payload:
    """Unpickling this runs ``func(*args)``: the classic pickle attack."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("attack", ["os.system", "builtins.eval", "subprocess.Popen", "builtins.exec"])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, attack):
    marker = tmp_path / "pwned"
    command = f"touch {marker}"
    import builtins
    import subprocess

    payloads = {
        "os.system": _Payload(os.system, command),
        "builtins.eval": _Payload(builtins.eval, f"open({str(marker)!r}, 'w').close()"),
        "builtins.exec": _Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.Popen": _Payload(subprocess.Popen, ["touch", str(marker)]),
    }
    path = tmp_path / "evil.pt"
    # Saved inside a real torch checkpoint, next to a legitimate-looking model entry.
    torch.save({"model": payloads[attack], "epoch": 1}, path)
    with pytest.raises(EdgeYoloError, match="refused") as err:
        load_checkpoint(path)
    assert attack.split(".")[-1] in str(err.value) or "posix" in str(err.value)
    assert not marker.exists(), "code from the checkpoint ran"


def test_plain_pickle_with_a_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "legacy.pt"
    with open(path, "wb") as f:
        pickle.dump(_Payload(os.system, f"touch {marker}"), f)
    with pytest.raises(EdgeYoloError):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(bytes(range(256)) * 16), "corrupt"),
        (lambda p: torch.save({"weights": torch.zeros(3)}, p), "not a YOLOv5"),
        (lambda p: torch.save([1, 2, 3], p), "not a YOLOv5"),
    ],
    ids=["empty", "random-bytes", "state-dict", "list"],
)
def test_bad_checkpoints_give_one_clear_error(tmp_path, make, message):
    path = tmp_path / "bad.pt"
    make(path)
    with pytest.raises(EdgeYoloError, match=message):
        load_checkpoint(path)


def test_truncated_checkpoint(tmp_path, yolov5n_pt):
    data = yolov5n_pt.read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(EdgeYoloError, match="corrupt"):
        load_checkpoint(path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(EdgeYoloError, match="no such"):
        load_checkpoint(tmp_path / "nope.pt")


def test_wrong_weights_for_the_architecture(tmp_path):
    model = random_model(yaml_v6(nc=80))
    path = save_ultralytics_like(model, tmp_path / "x.pt")
    with zipfile.ZipFile(path) as zf:
        assert any(n.endswith("data.pkl") for n in zf.namelist())
    # Same pickle, but the architecture claims another class count: shapes cannot fit.
    model = random_model(yaml_v6(nc=80))
    model.yaml["nc"] = 5
    path = save_ultralytics_like(model, tmp_path / "y.pt")
    with pytest.raises(EdgeYoloError, match="do not fit"):
        load_checkpoint(path)


def test_unknown_weight_name_is_one_clear_error():
    with pytest.raises(EdgeYoloError, match="known weight name"):
        resolve_weights("yolov9z")
