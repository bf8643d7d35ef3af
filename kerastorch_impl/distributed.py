"""Data-parallel runs on the Keras-on-PyTorch side (mirror of torch_impl/distributed.py): not available.

The other two backends use their framework's own engine (torch DDP; tf.distribute
MultiWorkerMirroredStrategy, which Keras on TensorFlow runs inside). Keras 3's
own distribution API (``keras.distribution``) is implemented for JAX only, and a
Keras model wrapped in torch's DDP would be a home-made engine, not Keras's. So
keras-torch runs in one process: ``RunSpec`` refuses ``nproc * nnodes > 1`` for
it (common.config.SINGLE_PROCESS_BACKENDS) with one message naming --nproc, and
the backend's ``setup`` refuses such a spec again. The names below keep the
mirror rule (same public names in the three packages); whatever would join an
engine refuses with the same message.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from common.config import RunSpec
from common.errors import UserError
from torch_impl import distributed as _torch_distributed

ENGINE = "none (keras-torch runs in one process)"
_REFUSAL = ("keras-torch has no data-parallel engine (Keras's distribution API runs on JAX only): "
            "run it with --nproc 1 --nnodes 1")


def collective_backend(device: torch.device) -> str:
    """No collectives: one process."""
    raise UserError(_REFUSAL)


def local_rank() -> int:
    """This process's rank on its host: 0 (torchrun's LOCAL_RANK if a launcher set one)."""
    return _torch_distributed.local_rank()


class Engine:
    """Refuses to start: keras-torch has no data-parallel engine (module docstring)."""

    def __init__(self, spec: RunSpec, device: torch.device):
        raise UserError(_REFUSAL)

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        raise UserError(_REFUSAL)
        yield  # pragma: no cover (a generator, like the other sides' scope)

    def wrap_model(self, model: Any) -> Any:
        raise UserError(_REFUSAL)

    def barrier(self) -> None:
        raise UserError(_REFUSAL)

    def shutdown(self) -> None:
        raise UserError(_REFUSAL)


def gradient_reduction(train_step: Any) -> str:
    """No reduction across replicas: one process."""
    raise UserError(_REFUSAL)


def bn_statistics(model: Any) -> str | None:
    """No replicas: one process."""
    raise UserError(_REFUSAL)
