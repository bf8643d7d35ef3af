"""Start the ranks of a data-parallel run on this host, each framework the way its own launcher would.

* torch: the environment ``torchrun`` gives every process (RANK, LOCAL_RANK,
  WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR, MASTER_PORT); rank 0
  hosts torch's TCPStore at MASTER_ADDR:MASTER_PORT.
* TensorFlow: ``TF_CONFIG`` with every worker's host:port and this worker's
  index (plus DUALBENCH_LOCAL_RANK, which TF_CONFIG lacks, to pick a GPU).
* Both: OMP_NUM_THREADS = the per-process thread budget (torchrun would set 1
  for N > 1; TensorFlow ignores it and gets the same budget in code).

Ports are free ones picked here (a busy ``--master-port`` is replaced and the
replacement recorded); if a rank still fails to bind (another program took the
port in between), the whole group is started again on fresh ports, up to
``PORT_ATTEMPTS`` times. Several hosts agree on the cluster through
compare.rendezvous. Failures are judged in ``result_from_group``.
"""
from __future__ import annotations

import json
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from common.config import RunSpec
from common.distributed import thread_budget
from common.registry import worker_command
from compare.process import GroupOutcome, run_group, stderr_tail

PORT_ATTEMPTS = 3  # group starts on fresh ports after a bind failure
GRACE_S = 10.0  # after one rank fails, the others may end on their own this long before they are killed
TF_CONFIG_BACKENDS = ("tensorflow",)  # launched with TF_CONFIG; every other backend gets torchrun's variables
TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                      "MASTER_PORT")
_BIND_ERRORS = ("address already in use", "eaddrinuse", "errno 98", "failed to bind", "could not bind")


@dataclass
class Launch:
    """How this host takes part in every data-parallel run (the same flags on every host but node_rank)."""

    nnodes: int = 1  # hosts in the run
    node_rank: int = 0  # this host's index; 0 hosts rank 0 (the chief) and writes the results
    master_addr: str = "127.0.0.1"  # host of rank 0, reachable from every host
    master_port: int | None = None  # one host: torch's store port (replaced if busy); several: the rendezvous


@dataclass
class Cluster:
    """Where the ranks of one launch meet."""

    master_addr: str  # rank 0's host
    master_port: int  # torch's TCPStore on rank 0's host
    workers: list[str]  # TensorFlow: every rank's host:port, by global rank
    notes: list[str] = field(default_factory=list)  # ports that were busy and replaced


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports the kernel reports free now (all held open together while picked)."""
    sockets = []
    try:
        for _ in range(count):
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(probe)
            probe.bind((host, 0))
        return [probe.getsockname()[1] for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


def local_cluster(spec: RunSpec, launch: Launch, attempt: int = 0) -> Cluster:
    """One host: free localhost ports for torch's store and every TensorFlow worker.

    The user's ``--master-port`` is used on the first attempt when it is free; a busy
    one is replaced (and the replacement noted in the run's record).
    """
    host, notes = "127.0.0.1", []
    ports = free_ports(spec.nproc + 1, host)
    master = ports[0]
    if launch.master_port is not None:
        if attempt == 0 and port_is_free(launch.master_port, host):
            master = launch.master_port
        else:
            notes.append(f"--master-port {launch.master_port} was busy: used {master}")
    return Cluster(host, master, [f"{host}:{port}" for port in ports[1:]], notes)


def rank_env(base: dict[str, str], backend: str, cluster: Cluster, spec: RunSpec, rank: int,
             local_rank: int, node_rank: int = 0) -> dict[str, str]:
    """The environment of one rank: torchrun's variables or TF_CONFIG, and the thread budget."""
    env = {k: v for k, v in base.items() if k not in TORCHRUN_VARIABLES and k != "TF_CONFIG"}
    env["OMP_NUM_THREADS"] = str(thread_budget(spec))
    if backend in TF_CONFIG_BACKENDS:
        env["TF_CONFIG"] = json.dumps({"cluster": {"worker": cluster.workers},
                                       "task": {"type": "worker", "index": rank}})
        env["DUALBENCH_LOCAL_RANK"] = str(local_rank)
    else:
        env.update(RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(spec.world_size),
                   LOCAL_WORLD_SIZE=str(spec.nproc), GROUP_RANK=str(node_rank),
                   MASTER_ADDR=cluster.master_addr, MASTER_PORT=str(cluster.master_port))
    return env


@dataclass
class GroupRun:
    """One launch of this host's ranks: what ran where, and how it ended."""

    outcome: GroupOutcome
    cluster: Cluster
    ranks: list[int]  # global rank of each local process
    log_paths: list[Path]  # each rank's stderr (and, past rank 0, stdout)
    attempts: int = 1


def local_ranks(spec: RunSpec, launch: Launch) -> list[int]:
    """Global ranks of this host's processes: node_rank * nproc + local rank."""
    return [launch.node_rank * spec.nproc + local for local in range(spec.nproc)]


def start_ranks(spec: RunSpec, task_args: Callable[[int], list[str]], log_path: Callable[[int], Path],
                base_env: dict[str, str], launch: Launch, cluster: Cluster, *, timeout_s: float | None,
                on_event: Callable[[dict[str, Any]], None] | None = None) -> GroupRun:
    """Start this host's ranks (``python -m <worker> *task_args(rank)``) in ``cluster``; wait for them all."""
    ranks = local_ranks(spec, launch)
    argvs = [[sys.executable, *worker_command(spec.backend), *task_args(rank)] for rank in ranks]
    envs = [rank_env(base_env, spec.backend, cluster, spec, rank, local, launch.node_rank)
            for local, rank in enumerate(ranks)]
    logs = [log_path(rank) for rank in ranks]
    outcome = run_group(argvs, envs, logs, timeout_s=timeout_s, grace_s=GRACE_S, on_event=on_event)
    return GroupRun(outcome, cluster, ranks, logs)


def bind_failed(run: GroupRun) -> bool:
    """Did a rank fail because its port was taken (the group can start again on fresh ports)?"""
    for rank_outcome, log in zip(run.outcome.ranks, run.log_paths):
        if rank_outcome.returncode not in (0, None) and not rank_outcome.killed_by_parent:
            text = stderr_tail(log, lines=200).lower()
            if any(pattern in text for pattern in _BIND_ERRORS):
                return True
    return False


def launch_local(spec: RunSpec, task_args: Callable[[int], list[str]], log_path: Callable[[int], Path],
                 base_env: dict[str, str], launch: Launch | None = None, *, timeout_s: float | None,
                 on_event: Callable[[dict[str, Any]], None] | None = None,
                 before_retry: Callable[[], None] | None = None) -> GroupRun:
    """All ranks on this host (one host), started again on fresh ports after a bind failure
    (``before_retry`` clears what a failed attempt left, e.g. its result files)."""
    launch = launch or Launch()
    for attempt in range(PORT_ATTEMPTS):
        cluster = local_cluster(spec, launch, attempt)
        run = start_ranks(spec, task_args, log_path, base_env, launch, cluster, timeout_s=timeout_s,
                          on_event=on_event)
        run.attempts = attempt + 1
        if run.outcome.interrupted or not bind_failed(run) or attempt == PORT_ATTEMPTS - 1:
            return run
        if before_retry is not None:
            before_retry()
    raise AssertionError("unreachable")
