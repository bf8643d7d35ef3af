"""Data-parallel runs, the framework-free part: what both engines must share to mean the same thing.

The engines are each framework's own: ``torch_impl/distributed.py`` (torch.distributed +
DistributedDataParallel) and ``tf_impl/distributed.py`` (tf.distribute
MultiWorkerMirroredStrategy with a custom loop). What makes their runs comparable is
defined once, here:

* **data**: one lockstep plan for the GLOBAL batch (per-replica batch x world size),
  sharded by ``common.sampler.shard_plan``: replica r gets slice r of every global batch,
  the same images, crops and flips in both frameworks;
* **learning rate**: ``lr_factor`` (``--lr-scaling none|linear``), applied by the loop to
  the LR it feeds both sides;
* **threads**: ``thread_budget`` = usable cores / processes per host, on both sides;
* **BatchNorm**: per-replica batch statistics and replica-local moving statistics on both
  (DDP's buffer broadcast off); the chief (replica 0) evaluates with its own statistics;
* **who writes**: only the chief (rank 0) writes results, checkpoints and progress.

``Replica`` is what a backend reports about its process after ``setup``.
"""
from __future__ import annotations

import socket
from dataclasses import asdict, dataclass
from typing import Any

from common.config import RunSpec
from common.errors import UserError
from common.manifest import usable_cores
from common.sampler import EpochPlan, epoch_plan, shard_plan

NO_ENGINE = "none"  # a single process: no distributed engine, no collective
# BatchNorm semantics of a data-parallel run, the same text on both sides when the read-back agrees:
BN_PER_REPLICA = ("per-replica batch statistics; replica-local moving statistics; "
                  "evaluation with replica 0's")
DATA_SHARDING = "one global plan per epoch, replica r takes slice r of every global batch (common.sampler)"


@dataclass(frozen=True)
class Replica:
    """This process's place in the run (a single process is rank 0 of a world of 1)."""

    rank: int = 0  # global rank, 0 = the chief (the only one that writes)
    world_size: int = 1  # replicas in the run, one per process
    local_rank: int = 0  # rank among the processes on this host
    engine: str = NO_ENGINE  # e.g. "torch.distributed DDP", "tf.distribute MultiWorkerMirroredStrategy"
    collective_backend: str | None = None  # gloo | nccl | ring ... (None without an engine)
    hosts: tuple[str, ...] = ()  # every rank's host name, by rank (gathered through the engine)

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "hosts": list(self.hosts)}


def single_process() -> Replica:
    """The Replica of a run without an engine."""
    return Replica(hosts=(socket.gethostname(),))


def configuration_label(model: str, world_size: int) -> str:
    """How tables, figures and the audit name a run's configuration: the model, plus the world size
    of a data-parallel run ("resnet20 (world 2)"), so runs of different sizes are never pooled."""
    return model if world_size == 1 else f"{model} (world {world_size})"


def thread_budget(spec: RunSpec) -> int:
    """Intra-op threads per process: ``--threads`` if given, else usable cores / processes on this host."""
    return spec.threads or max(1, usable_cores() // spec.nproc)


def lr_factor(spec: RunSpec) -> float:
    """Multiplier of every learning rate the loop feeds: 1, or the world size under ``--lr-scaling linear``."""
    return float(spec.world_size) if spec.lr_scaling == "linear" else 1.0


def global_batch_size(spec: RunSpec) -> int:
    return spec.recipe.batch_size * spec.world_size


def global_plan(spec: RunSpec, epoch: int, num_train: int) -> EpochPlan:
    """The epoch's lockstep plan over global batches (the single-process plan when the world is 1)."""
    r = spec.recipe
    return epoch_plan(spec.seed, epoch, num_train, global_batch_size(spec), drop_last=r.drop_last,
                      augment=r.augment, crop_padding=r.crop_padding, horizontal_flip=r.horizontal_flip)


def replica_plan(plan: EpochPlan, replica: Replica) -> EpochPlan:
    """This replica's shard of a global plan."""
    return shard_plan(plan, replica.rank, replica.world_size)


def check_world(spec: RunSpec, world_size: int, where: str) -> None:
    """The engine's world must be the spec's: a mismatch means the launch went wrong."""
    if world_size != spec.world_size:
        raise UserError(f"{where} reports a world of {world_size} processes but the run asked for "
                        f"{spec.world_size} (--nproc {spec.nproc} x --nnodes {spec.nnodes}): start every "
                        "host with the same --nproc and --nnodes")


def audit_settings(spec: RunSpec, replica: Replica, *, gradient_reduction: str | None,
                   bn_statistics: str | None, data_threads: int | None) -> dict[str, Any]:
    """The data-parallel rows of the fairness audit (common.audit.DISTRIBUTED_KEYS); {} for one process.

    ``gradient_reduction``, ``bn_statistics`` and ``data_threads`` are read back by the
    backend from the objects it built (DDP / the strategy, BN layers, the input pipeline).
    """
    if spec.world_size == 1:
        return {}
    return {"world_size": replica.world_size, "global_batch_size": global_batch_size(spec),
            "lr_scaling": f"{spec.lr_scaling} (peak LR {spec.recipe.lr * lr_factor(spec):g})",
            "data_sharding": DATA_SHARDING, "gradient_reduction": gradient_reduction,
            "bn_statistics": bn_statistics, "pipeline_threads": data_threads,
            "engine": replica.engine, "collective_backend": replica.collective_backend}
