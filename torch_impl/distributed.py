"""torch.distributed + DistributedDataParallel: the torch engine of data-parallel runs (mirror of tf_impl/distributed.py).

The process joins with ``init_process_group(init_method="env://")`` from the
variables torchrun would set (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT; compare.launch sets them): gloo on the CPU, nccl on
CUDA. ``timeout`` bounds every collective, so a replica that dies or hangs
ends the others' wait with an error instead of a hang.

DDP (torch_impl.optim.TrainStep wraps the model) averages gradients over the
replicas (all-reduce, then / world size). ``broadcast_buffers=False``: DDP's
default copies rank 0's BN moving statistics into every replica before each
forward; TensorFlow keeps them replica-local, and so does this side, so
replica r's statistics are the same in both frameworks and the chief
evaluates with its own (common.distributed).
"""
from __future__ import annotations

import contextlib
import os
import socket
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from common.config import RunSpec
from common.distributed import BN_PER_REPLICA, Replica, check_world

ENGINE = "torch.distributed DDP"


def collective_backend(device: torch.device) -> str:
    """gloo on the CPU, nccl on CUDA (torch's own choice for each)."""
    return "nccl" if device.type == "cuda" else "gloo"


def local_rank() -> int:
    """This process's rank on its host (torchrun's LOCAL_RANK; 0 without one): its GPU index."""
    return int(os.environ.get("LOCAL_RANK", "0"))


class Engine:
    """This process inside torch.distributed (call ``shutdown`` at the end)."""

    def __init__(self, spec: RunSpec, device: torch.device):
        self.device, self.backend = device, collective_backend(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)  # nccl binds the process group to the current device
        dist.init_process_group(self.backend, init_method="env://",
                                timeout=timedelta(seconds=spec.collective_timeout_s))
        check_world(spec, dist.get_world_size(), "torch.distributed")
        hosts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(hosts, socket.gethostname())  # also proves every rank can talk to every other
        self.replica = Replica(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank(),
                               engine=ENGINE, collective_backend=self.backend, hosts=tuple(hosts))

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """Where models and optimizers are built (DDP wraps them later: nothing to enter on this side)."""
        yield

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """DDP around ``model``: mean gradients over replicas, BN moving statistics left replica-local."""
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)

    def barrier(self) -> None:
        dist.barrier()

    def shutdown(self) -> None:
        """A last barrier (every rank got here), then leave the process group."""
        dist.barrier()
        dist.destroy_process_group()


def gradient_reduction(wrapped: nn.Module) -> str:
    """How DDP combines gradients, read back from the DDP object (a comm hook would change it)."""
    hook = wrapped._get_ddp_logging_data().get("comm_hook") or None  # set only by register_comm_hook
    size = wrapped.process_group.size()
    return f"mean over {size} replicas" if hook is None else f"comm hook {hook} over {size} replicas"


def bn_statistics(wrapped: nn.Module) -> str | None:
    """BN semantics read back from the layers and from DDP (None without BatchNorm)."""
    norms = [m for m in wrapped.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return None
    if any(isinstance(m, nn.SyncBatchNorm) for m in norms):
        return "synchronized batch statistics (SyncBatchNorm)"
    if wrapped.broadcast_buffers:
        return "moving statistics broadcast from replica 0 before every forward (DDP broadcast_buffers)"
    return BN_PER_REPLICA
