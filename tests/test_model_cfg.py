"""--cfg: YOLOv5 model yamls validated as untrusted input, built, and initialised from matching weights."""

from __future__ import annotations

import pytest
import torch
import yaml

from edgeyolo.errors import EdgeYoloError
from edgeyolo.model import build_from_cfg, load_model
from edgeyolo.model.cfg import (
    STANDARD_MULTIPLES,
    count_parameters,
    read_cfg,
    standard_cfg,
)


@pytest.fixture(scope="module")
def yolov5n_ckpt(yolov5n_pt):
    return load_model(yolov5n_pt)


def test_standard_description_is_the_released_yolov5n(yolov5n_ckpt):
    assert standard_cfg("yolov5n") == {k: v for k, v in yolov5n_ckpt.model.yaml.items() if k != "ch"}


def test_build_transfers_every_matching_tensor(yolov5n_ckpt):
    model, transferred = build_from_cfg("yolov5n", init_from=yolov5n_ckpt)
    assert transferred == len(model.state_dict()) - 1  # all but the anchors, which come from the yaml
    assert model.names == yolov5n_ckpt.names
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), yolov5n_ckpt.model(x))


def test_custom_class_count_reinitialises_only_the_head(yolov5n_ckpt):
    model, transferred = build_from_cfg("yolov5n", nc=3, init_from=yolov5n_ckpt)
    head = [k for k in model.state_dict() if k.startswith("model.24.m.")]
    assert transferred == len(model.state_dict()) - 1 - len(head)
    assert model.detect.nc == 3 and model.names == ["class0", "class1", "class2"]
    assert torch.equal(model.model[0].conv.weight, yolov5n_ckpt.model.model[0].conv.weight)


def test_other_sizes_and_activation(yolov5n_ckpt):
    model, transferred = build_from_cfg("yolov5s.yaml", init_from=yolov5n_ckpt, act="ReLU", names=["a", "b"])
    assert 0 < transferred < len(model.state_dict()) / 2  # only width-independent tensors fit
    assert isinstance(model.model[0].act, torch.nn.ReLU) and model.names == ["a", "b"]
    sizes = [count_parameters(standard_cfg(name)) for name in STANDARD_MULTIPLES]
    assert sizes == sorted(sizes) and 1.5e6 < sizes[0] < 2.5e6  # yolov5n ~1.9 M ... yolov5x ~86 M


def _write(tmp_path, cfg):
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(cfg) if isinstance(cfg, dict) else cfg)
    return path


def _broken(edit):
    cfg = standard_cfg("yolov5n")
    edit(cfg)
    return cfg


@pytest.mark.parametrize("cfg, message", [
    ("{{{", "not valid YAML"),
    (_broken(lambda c: c["backbone"].__setitem__(1, [-1, 1, "os.system", ["touch /tmp/x"]])), "unsupported module"),
    (_broken(lambda c: c.__setitem__("extra_key", 1)), "unknown key 'extra_key'"),
    (_broken(lambda c: c.pop("anchors")), "missing key 'anchors'"),
    (_broken(lambda c: c["head"].__setitem__(2, [[-1, 40], 1, "Concat", [1]])), "'from' must name earlier layers"),
    (_broken(lambda c: c.__setitem__("nc", -1)), "nc must be"),
    (_broken(lambda c: c["backbone"].__setitem__(8, [-1, 3, "C3", [90000]])), "parameters (limit"),
    (_broken(lambda c: c["head"].__setitem__(2, [[-1, 4], 1, "Concat", [1]])), "cannot build"),
])
def test_hostile_yaml_is_one_clear_error(tmp_path, cfg, message):
    with pytest.raises(EdgeYoloError, match=None) as info:
        build_from_cfg(_write(tmp_path, cfg))
    text = str(info.value)
    assert message in text and "\n" not in text, text


def test_unknown_name_or_missing_file(tmp_path):
    with pytest.raises(EdgeYoloError, match="no such model yaml"):
        read_cfg(tmp_path / "nope.yaml")
