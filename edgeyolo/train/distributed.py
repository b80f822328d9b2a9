"""Distributed data parallel: the process's place in a ``torchrun`` job, and launching one.

``torchrun`` (``torch.distributed.run``) sets RANK / WORLD_SIZE / LOCAL_RANK; we join the
group with gloo on CPU or NCCL on CUDA. Only rank 0 writes files, logs and validates; the
others wait at barriers. ``edgeyolo train --nproc N`` re-launches the same command through
``torch.distributed.run`` on this machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def from_env() -> DistInfo:
    """This process's rank, local rank and world size (single process when not under torchrun)."""
    return DistInfo(rank=int(os.environ.get("RANK", 0)), local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                    world_size=int(os.environ.get("WORLD_SIZE", 1)))


def init(info: DistInfo, device: torch.device) -> None:
    if info.enabled and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_flag(info: DistInfo, value: bool, device: torch.device) -> bool:
    """Rank 0's boolean, on every rank (e.g. 'stop now')."""
    if not info.enabled:
        return value
    t = torch.tensor([int(value)], device=device)
    dist.broadcast(t, 0)
    return bool(t.item())


def wrap(model: torch.nn.Module, info: DistInfo, device: torch.device, sync_bn: bool) -> torch.nn.Module:
    """SyncBatchNorm (optional) + DistributedDataParallel around ``model`` when distributed."""
    if not info.enabled:
        return model
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None)


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``python -m edgeyolo.cli <argv>`` as ``nproc`` processes on this machine via torchrun."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(["--nproc_per_node", str(nproc), "--standalone", "-m", "edgeyolo.cli", *argv])
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))  # share the cores
    try:
        run(args)
    except ChildFailedError as exc:  # each rank printed its own one-line error; pass on the first exit status
        codes = [f.exitcode for f in exc.failures.values() if f.exitcode and f.exitcode > 0]
        return codes[0] if codes else 1
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
