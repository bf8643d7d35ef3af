"""tf.distribute MultiWorkerMirroredStrategy: the TensorFlow engine of data-parallel runs (mirror of torch_impl/distributed.py).

One worker process per replica, as on the torch side. The cluster comes from
``TF_CONFIG`` (compare.launch writes it: every worker's host:port, this task's
index); collectives are RING on the CPU and NCCL on GPUs, each bounded by
``CommunicationOptions(timeout_seconds=...)`` so that a replica that dies or
hangs ends the others' wait with an error; TensorFlow's coordination service
also notices a dead peer from its missing heartbeats.

The training loop is dualbench's own custom loop (``strategy.run`` inside a
``tf.function``, tf_impl.optim.TrainStep), never Keras ``fit``, which is known
to break under this strategy (keras issue 20585, tensorflow issue 72388).
Gradients: the Keras optimizer sums them over replicas (its all-reduce), and
the step divides each replica's mean loss by the number of replicas, once: the
mean over replicas. BN moving statistics stay replica-local (the strategy does
not synchronise them, and tf_impl.layers.BatchNorm is not ``synchronized``).

Several GPUs inside ONE process (``MirroredStrategy``) are not used: dualbench
runs one process per replica on both sides, so the two engines are compared
process for process.
"""
from __future__ import annotations

import contextlib
import os
import socket
from typing import Any, Iterator

import keras
import numpy as np
import tensorflow as tf

from common.config import RunSpec
from common.distributed import BN_PER_REPLICA, Replica, check_world
from tf_impl.layers import BatchNorm

ENGINE = "tf.distribute MultiWorkerMirroredStrategy"
_HOST_CHARS = 64  # host names travel as fixed-length int32 codes through one all-gather


def collective_backend(device_type: str) -> str:
    """RING on the CPU (gRPC), NCCL on GPUs: TensorFlow's own implementations for each."""
    return "nccl" if device_type == "gpu" else "ring"


def local_rank() -> int:
    """This process's rank on its host: TF_CONFIG has none, so the launcher sets DUALBENCH_LOCAL_RANK."""
    return int(os.environ.get("DUALBENCH_LOCAL_RANK", "0"))


class Engine:
    """This process as one worker of a MultiWorkerMirroredStrategy (create before any other TF op)."""

    def __init__(self, spec: RunSpec, device_type: str):
        self.backend = collective_backend(device_type)
        implementation = tf.distribute.experimental.CommunicationImplementation
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=implementation.NCCL if self.backend == "nccl" else implementation.RING,
            timeout_seconds=float(spec.collective_timeout_s))
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        self.strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver,
                                                                  communication_options=options)
        world_size, rank = int(self.strategy.num_replicas_in_sync), int(resolver.task_id)
        check_world(spec, world_size, "tf.distribute")
        self.replica = Replica(rank=rank, world_size=world_size, local_rank=local_rank(), engine=ENGINE,
                               collective_backend=self.backend, hosts=self._gather_hosts(rank, world_size))

    def _gather_hosts(self, rank: int, world_size: int) -> tuple[str, ...]:
        """Every worker's host name, by rank, through the strategy's own all-reduce: each worker
        writes its name's character codes into its row of a zero matrix and the rows are summed."""
        name = socket.gethostname()[:_HOST_CHARS].ljust(_HOST_CHARS)
        rows = np.zeros((world_size, _HOST_CHARS), np.float32)
        rows[rank] = [ord(c) for c in name]
        table = _all_reduce_sum(self.strategy, tf.constant(rows))
        return tuple("".join(map(chr, row.astype(int))).rstrip() for row in table)

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """Models and optimizers built inside are mirrored over the workers."""
        with self.strategy.scope():
            yield

    def wrap_model(self, model: keras.Model) -> keras.Model:
        """The model the train step calls: itself (its variables were mirrored when built in ``scope``)."""
        return model

    def barrier(self) -> None:
        """All workers meet: one all-reduce of a scalar (the strategy has no barrier of its own)."""
        total = float(_all_reduce_sum(self.strategy, tf.constant(1.0)))
        if int(total) != self.replica.world_size:
            raise RuntimeError(f"barrier counted {int(total)} workers, expected {self.replica.world_size}")

    def shutdown(self) -> None:
        """A last barrier; the strategy has nothing to tear down (TF's runtime does at exit)."""
        self.barrier()


def _all_reduce_sum(strategy: Any, value: tf.Tensor) -> np.ndarray:
    """The sum over all workers of each worker's ``value`` (a collective every worker must enter)."""
    @tf.function
    def reduce(local):
        per_replica = strategy.run(lambda v: tf.identity(v), args=(local,))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    return reduce(value).numpy()


def gradient_reduction(train_step: Any) -> str:
    """How the step combines gradients: the optimizer sums over replicas, the loss is divided by
    ``train_step.loss_divisor`` before the gradient; mean iff that divisor is the replica count."""
    replicas = int(train_step.strategy.num_replicas_in_sync)
    divisor = train_step.loss_divisor
    return f"mean over {replicas} replicas" if divisor == replicas else f"sum over {replicas} replicas / {divisor}"


def bn_statistics(model: keras.Model) -> str | None:
    """BN semantics read back from the layers (None without BatchNorm)."""
    norms = [layer for layer in model.layers if isinstance(layer, BatchNorm)]
    if not norms:
        return None
    if any(getattr(layer, "synchronized", False) for layer in norms):
        return "synchronized batch statistics (Keras synchronized=True)"
    return BN_PER_REPLICA
