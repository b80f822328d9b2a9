"""A QAT result as an ordinary edgeyolo checkpoint: fine-tuned weights + the learned scales in its description.

QAT trains the BN-folded convolutions of the exported graph. They go back into the YOLOv5 ``Model``
as a convolution with the folded weight and a BatchNorm that is the identity plus the folded bias
(``weight 1, mean 0, var 1 − eps, bias b``), so ``Model.fuse()`` at export gives back the trained
numbers (to float32 rounding). The learned activation scales, the placement settings and the
calibrated ranges live in ``meta.qat`` (JSON), next to the tensors in the same safetensors file:
any command reads it as float weights; ``build --target cpu-int8`` reads the scales too.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ...errors import EdgeYoloError
from .learned import FORMAT, META_KEY, VERSION, check_qat_meta


def load_fused_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` whose convolutions compute the BN-folded ``weights`` (ONNX initializer names)."""
    model = copy.deepcopy(model).float()
    modules = dict(model.named_modules())
    state = model.state_dict()
    updates = {}
    for name, value in weights.items():
        owner, _, kind = name.rpartition(".")
        conv = modules.get(owner)
        if not isinstance(conv, nn.Conv2d) or kind not in ("weight", "bias"):
            raise EdgeYoloError(f"QAT: trained tensor {name!r} has no convolution in the model")
        if kind == "weight" or conv.bias is not None:
            updates[name] = value
            continue
        parent = owner.rpartition(".")[0]  # Conv block: .conv (no bias) followed by .bn
        bn = modules.get(f"{parent}.bn")
        if not isinstance(bn, nn.BatchNorm2d):
            raise EdgeYoloError(f"QAT: {owner} has a folded bias but no BatchNorm to hold it")
        updates.update({f"{parent}.bn.bias": value, f"{parent}.bn.weight": torch.ones_like(value),
                        f"{parent}.bn.running_mean": torch.zeros_like(value),
                        f"{parent}.bn.running_var": torch.full_like(value, 1.0 - bn.eps)})
    for key, value in updates.items():
        if key not in state or state[key].shape != value.shape:
            raise EdgeYoloError(f"QAT: trained tensor {key!r} does not fit the model")
    state.update(updates)
    model.load_state_dict(state)
    return model


def save_qat_checkpoint(model: nn.Module, path, qat: dict, metrics: dict | None = None):
    """Write the QAT checkpoint (our safetensors format) with ``qat`` as ``meta.qat``."""
    from ...model import save_model

    qat = {"format": FORMAT, "version": VERSION, **qat}
    check_qat_meta(qat, str(path))
    return save_model(model, path, metrics=metrics, meta={META_KEY: qat})
