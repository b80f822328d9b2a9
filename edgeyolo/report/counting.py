"""Parameters and GFLOPs of a model at an input size, counted once per (weights, size)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=None)
def model_cost(weights: str, imgsz: int) -> dict:
    """``{"params_m", "gflops"}`` of the checkpoint's model (BatchNorm folded, as deployed) for one
    ``imgsz`` x ``imgsz`` image; FLOPs are 2 x multiply-accumulates, as YOLOv5 reports them."""
    import copy

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ..model import load_model

    model = copy.deepcopy(load_model(Path(weights)).model).eval()
    if hasattr(model, "fuse"):
        model.fuse()
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, imgsz, imgsz))
    return {"params_m": round(params / 1e6, 3), "gflops": round(counter.get_total_flops() / 1e9, 2)}
