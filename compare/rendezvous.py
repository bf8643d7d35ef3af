"""Several hosts: host 0 leads every launch, the others follow (the same flags on every host).

torch's ranks need only rank 0's address; TensorFlow's TF_CONFIG needs every
worker's host:port, which no host knows alone. So, before each launch (an audit
or a run), the dualbench processes meet at ``--master-addr:--master-port``:

1. every follower (``--node-rank`` R > 0) connects and says where its ranks can
   be reached (its address as seen on the route to host 0, and free ports);
2. host 0 answers with the job (task, RunSpec) and the cluster: torch's store
   port on host 0, every TensorFlow worker's host:port by global rank;
3. each follower checks the job is one of its own runs (same flags), acknowledges
   it, starts its ``--nproc`` ranks, and reports how they ended: exit codes and
   stderr tails, which host 0 files with its own ranks' (``OUT/logs`` on host 0),
   so the record names the replica to blame wherever it ran;
4. after the last launch host 0 sends ``finished`` and every follower exits.

Only host 0 writes results. A follower waits at most ``RENDEZVOUS_TIMEOUT_S`` for
the next meeting; a rank that dies on any host ends the others through their
collectives' timeouts, as on one host. Messages are JSON lines over TCP.
"""
from __future__ import annotations

import json
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from common.config import RunSpec
from common.errors import UserError
from common.execution import requested
from common.results import write_json_atomic
from compare.launch import GRACE_S, Cluster, GroupRun, Launch, free_ports, start_ranks
from compare.process import RankOutcome, stderr_tail, worker_env

RENDEZVOUS_TIMEOUT_S = 600.0  # how long a host waits for the others to reach the next launch
FINISH_AFTER_ERROR_S = 15.0  # host 0 ending on an error: how long it waits to tell the followers


def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    conn.sendall((json.dumps(message) + "\n").encode("utf-8"))


def _receive(conn: socket.socket, timeout_s: float) -> dict[str, Any]:
    conn.settimeout(timeout_s)
    buffer = b""
    while not buffer.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("the other host closed the connection")
        buffer += chunk
    return json.loads(buffer.decode("utf-8"))


def _reachable_address(master_addr: str) -> str:
    """This host's address on the route to host 0 (what the other hosts can reach)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((master_addr, 9))  # no packet is sent: this only picks the route
            return probe.getsockname()[0]
        except OSError:
            return socket.gethostname()


def _meet_followers(launch: Launch,
                    timeout_s: float = RENDEZVOUS_TIMEOUT_S) -> list[tuple[socket.socket, dict[str, Any]]]:
    """Host 0: accept one connection per follower; (connection, hello) ordered by node rank."""
    server = socket.create_server(("", launch.master_port), reuse_port=False)
    server.settimeout(timeout_s)
    followers = []
    try:
        while len(followers) < launch.nnodes - 1:
            try:
                conn, _ = server.accept()
            except socket.timeout:
                raise UserError(f"only {len(followers) + 1} of {launch.nnodes} hosts reached "
                                f"{launch.master_addr}:{launch.master_port} within {timeout_s:g} s: "
                                "start dualbench on every host with the same flags") from None
            followers.append((conn, _receive(conn, RENDEZVOUS_TIMEOUT_S)))
    finally:
        server.close()
    return sorted(followers, key=lambda item: item[1]["node_rank"])


def launch_leader(spec: RunSpec, task_args: Callable[[int], list[str]], log_path: Callable[[int], Path],
                  base_env: dict[str, str], launch: Launch, *, timeout_s: float | None,
                  on_event: Callable[[dict[str, Any]], None] | None = None) -> GroupRun:
    """Host 0's side of one launch: meet, hand out the job, run rank 0..nproc-1, gather the others' reports."""
    followers = _meet_followers(launch)
    ports = free_ports(spec.nproc + 1)
    workers = [f"{launch.master_addr}:{port}" for port in ports[1:]]
    for _conn, hello in followers:
        workers += [f"{hello['host']}:{port}" for port in hello["ports"]]
    cluster = Cluster(launch.master_addr, ports[0], workers)
    job = {"task": task_args(0)[0], "spec": spec.to_dict(), "master_addr": cluster.master_addr,
           "master_port": cluster.master_port, "workers": workers}
    for conn, _hello in followers:
        _send(conn, job)
    for conn, hello in followers:
        answer = _receive(conn, RENDEZVOUS_TIMEOUT_S)
        if answer.get("refuse"):
            raise UserError(f"host {hello['node_rank']} ({hello['host']}) refused {spec.run_id()}: "
                            f"{answer['refuse']}")
    run = start_ranks(spec, task_args, log_path, base_env, launch, cluster, timeout_s=timeout_s,
                      on_event=on_event)
    wait_s = spec.collective_timeout_s + 2 * GRACE_S + 60
    try:
        for conn, hello in followers:
            _file_report(run, _receive(conn, wait_s), hello, log_path)
    except (OSError, ValueError) as exc:
        run.outcome.first_failure = run.outcome.first_failure or 0
        print(f"dualbench: warning: a follower host did not report ({exc})")
    finally:
        for conn, _hello in followers:
            conn.close()
    return run


def _file_report(run: GroupRun, report: dict[str, Any], hello: dict[str, Any],
                 log_path: Callable[[int], Path]) -> None:
    """Add a follower's ranks to ``run`` as if they were local: outcome, and a log holding their tail."""
    for row in report["ranks"]:
        outcome = RankOutcome(row["rank"], row["returncode"], row["signal"], row["killed_by_parent"],
                              row.get("host_peak_rss_bytes"))
        log = log_path(row["rank"])
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"(stderr tail from host {hello['host']}, node {hello['node_rank']})\n{row['tail']}\n")
        run.ranks.append(row["rank"])
        run.outcome.ranks.append(outcome)
        run.log_paths.append(log)
        if outcome.returncode not in (0, None) and run.outcome.first_failure is None:
            run.outcome.first_failure = len(run.ranks) - 1


def finish_followers(launch: Launch, *, after_error: bool = False) -> None:
    """Host 0, after its last launch: tell every follower to exit.

    After an error (a follower that refused has exited already) host 0 waits only briefly and
    never raises over the error that ended it.
    """
    try:
        followers = _meet_followers(launch, FINISH_AFTER_ERROR_S if after_error else RENDEZVOUS_TIMEOUT_S)
    except (UserError, OSError):
        if after_error:
            return
        raise
    for conn, _hello in followers:
        _send(conn, {"finished": True})
        conn.close()


def _join(launch: Launch, nproc: int) -> tuple[socket.socket, dict[str, Any]]:
    """A follower: connect to host 0 (retrying while it is busy or not up yet), say hello, get the job."""
    deadline = time.monotonic() + RENDEZVOUS_TIMEOUT_S
    while True:
        try:
            conn = socket.create_connection((launch.master_addr, launch.master_port), timeout=10)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise UserError(f"host 0 at {launch.master_addr}:{launch.master_port} did not answer within "
                                f"{RENDEZVOUS_TIMEOUT_S:g} s: start it with --node-rank 0 and the same flags") from None
            time.sleep(1.0)
    _send(conn, {"node_rank": launch.node_rank, "host": _reachable_address(launch.master_addr),
                 "ports": free_ports(nproc, "0.0.0.0")})
    return conn, _receive(conn, RENDEZVOUS_TIMEOUT_S)


def follow(store: Any, specs: list[RunSpec], launch: Launch, *, timeout_s: float | None) -> int:
    """A host with --node-rank > 0: run host 0's launches until it says finished. Returns the exit code."""
    mine = {spec.run_id(): spec for spec in specs}
    while True:
        conn, job = _join(launch, specs[0].nproc)
        with conn:
            if job.get("finished"):
                return 0
            spec = RunSpec.from_dict(job["spec"])
            own = mine.get(spec.run_id())
            # where files go may differ; the execution configuration is host 0's (resolved there)
            where = {"checkpoint_dir": own.checkpoint_dir, "final_weights_path": own.final_weights_path,
                     "execution": own.to_dict()["execution"]} if own else {}
            if own is None or own.to_dict() != {**spec.to_dict(), **where}:
                _send(conn, {"refuse": "its flags differ from this host's (start every host with the same flags)"})
                raise UserError(f"host 0 asked for {spec.run_id()}, which this host's flags do not give: "
                                "start every host with the same flags")
            _send(conn, {"ack": True})
            env = worker_env(requested(spec))  # host 0's execution configuration (oneDNN, malloc)
            _send(conn, {"ranks": _run_job(store, spec, job, launch, env, timeout_s)})


def _run_job(store: Any, spec: RunSpec, job: dict[str, Any], launch: Launch, env: dict[str, str],
             timeout_s: float | None) -> list[dict[str, Any]]:
    workdir = Path(tempfile.mkdtemp(prefix=".work-", dir=store.root))
    try:
        spec_path = workdir / "spec.json"
        write_json_atomic(spec_path, spec.to_dict())
        name = ("audit__" if job["task"] == "audit" else "") + spec.run_id()
        cluster = Cluster(job["master_addr"], job["master_port"], job["workers"])
        run = start_ranks(spec, lambda rank: [job["task"], str(spec_path), str(workdir / f"result.rank{rank}.json")],
                          lambda rank: store.log_path(f"{name}.rank{rank}"), env, launch, cluster,
                          timeout_s=timeout_s)
        return [{"rank": rank, "returncode": o.returncode, "signal": o.signal_name,
                 "killed_by_parent": o.killed_by_parent, "host_peak_rss_bytes": o.host_peak_rss_bytes,
                 "tail": stderr_tail(log)}
                for rank, o, log in zip(run.ranks, run.outcome.ranks, run.log_paths)]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
