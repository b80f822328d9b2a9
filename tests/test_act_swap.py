"""Activation swap: same structure and weights, another activation, and it round-trips."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgeyolo.errors import EdgeYoloError
from edgeyolo.model import load_model, load_native, save_model
from edgeyolo.model.blocks import Conv
from edgeyolo.optimize.act_swap import ACT_CHOICES, swap_activation


@pytest.fixture(scope="module")
def yolov5n(yolov5n_pt):
    return load_model(yolov5n_pt).model


@pytest.mark.parametrize("name", sorted(ACT_CHOICES))
def test_structure_and_weights_kept(yolov5n, name):
    swapped = swap_activation(yolov5n, name)
    a, b = yolov5n.state_dict(), swapped.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    acts = {type(m.act) for m in swapped.modules() if isinstance(m, Conv)}
    expected = {"relu": nn.ReLU, "relu6": nn.ReLU6, "leakyrelu": nn.LeakyReLU, "hardswish": nn.Hardswish,
                "silu": nn.SiLU}[name]
    assert acts == {expected}
    assert all(isinstance(m.act, nn.SiLU) for m in yolov5n.modules() if isinstance(m, Conv))  # original untouched


def test_relu_changes_outputs_and_round_trips(yolov5n, tmp_path):
    swapped = swap_activation(yolov5n, "relu")
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        out = swapped(x)
        assert out.shape == yolov5n(x).shape
        assert not torch.allclose(out, yolov5n(x))
        back = load_native(save_model(swapped, tmp_path / "relu.safetensors")).model
        torch.testing.assert_close(back(x), out)
    assert all(isinstance(m.act, nn.ReLU) for m in back.modules() if isinstance(m, Conv))


def test_unknown_activation_is_refused(yolov5n):
    with pytest.raises(EdgeYoloError, match="--act"):
        swap_activation(yolov5n, "gelu")


def test_gflops_do_not_depend_on_the_activation(yolov5n):
    """torch-pruning's counter charges ReLU but not SiLU; GFLOPs are counted as YOLOv5 does (neither)."""
    from edgeyolo.optimize.measure import model_size

    base = model_size(yolov5n)
    assert abs(base.gflops - 4.52) < 0.01
    assert model_size(swap_activation(yolov5n, "relu")) == base
