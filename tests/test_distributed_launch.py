"""Data-parallel launches without a framework: sharding, options, the group launcher, ports, hosts, scaling.

The fake backend (tests/fake_backend.py) runs one numpy process per rank with torchrun's
variables and no collectives: it exercises the launcher, the watchdog, chief-only writing,
port handling and the rendezvous of several hosts quickly. The real engines are tested in
tests/test_distributed.py and tests/test_distributed_faults.py.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from common.audit import compare_settings
from common.config import Recipe, RunSpec
from common.distributed import BN_PER_REPLICA, configuration_label, thread_budget
from common.errors import ConfigError
from common.manifest import usable_cores
from common.results import RunResult
from common.sampler import epoch_plan, shard_plan
from compare import launch as launch_module
from compare.launch import Cluster, Launch, local_cluster, rank_env
from compare.scaling import scaling_table, shared_host_note
from tests.runner_helpers import PROJECT_ROOT, SMALL, fake_env, fake_run, launch_pids, launches, rows, run_cli  # noqa: F401


def _error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("dualbench: error:"), err
    return err[0]


# -- framework-free pieces ----------------------------------------------------------------------


def test_shard_plan_splits_every_global_batch_into_contiguous_slices():
    plan = epoch_plan(seed=1, epoch=2, num_examples=50, batch_size=12)  # 4 global batches, 2 images dropped
    shards = [shard_plan(plan, rank, 3) for rank in range(3)]
    assert all(s.batch_size == 4 and s.num_batches == 4 and s.dataset_size == 50 for s in shards)
    for step, (start, stop) in enumerate(plan.batch_bounds()):
        together = np.concatenate([s.order[step * 4:(step + 1) * 4] for s in shards])
        assert np.array_equal(together, plan.order[start:stop])
        flips = np.concatenate([s.flips[step * 4:(step + 1) * 4] for s in shards])
        assert np.array_equal(flips, plan.flips[start:stop])
    assert shard_plan(plan, 0, 1) is plan  # one process: the plan itself
    with pytest.raises(ValueError):
        shard_plan(plan, 0, 5)  # 12 does not split into 5
    with pytest.raises(ValueError):
        shard_plan(plan, 3, 3)


def test_run_spec_names_the_world_and_needs_equal_batches():
    assert RunSpec(model="seed_cnn", backend="torch").run_id() == "seed_cnn__torch__seed0"
    spec = RunSpec(model="seed_cnn", backend="torch", nproc=2, nnodes=2)
    assert spec.world_size == 4 and spec.run_id() == "seed_cnn__torch__seed0__world4"
    with pytest.raises(ConfigError, match="drop_last"):
        RunSpec(model="seed_cnn", backend="torch", nproc=2, recipe=Recipe(drop_last=False))
    with pytest.raises(ConfigError, match="lr_scaling"):
        RunSpec(model="seed_cnn", backend="torch", lr_scaling="sqrt")
    assert configuration_label("resnet20", 1) == "resnet20"
    assert configuration_label("resnet20", 2) == "resnet20 (world 2)"


def test_each_framework_gets_its_own_launch_environment_and_the_same_thread_budget():
    spec = RunSpec(model="seed_cnn", backend="torch", nproc=2)
    cluster = Cluster("10.0.0.1", 29500, ["10.0.0.1:4001", "10.0.0.1:4002"])
    base = {"PATH": "/bin", "TF_CONFIG": "stale", "RANK": "9"}
    torch_env = rank_env(base, "torch", cluster, spec, rank=1, local_rank=1)
    assert {k: torch_env[k] for k in launch_module.TORCHRUN_VARIABLES} == {
        "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0",
        "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    assert "TF_CONFIG" not in torch_env
    tf_env = rank_env(base, "tensorflow", cluster, RunSpec(model="seed_cnn", backend="tensorflow", nproc=2),
                      rank=1, local_rank=1)
    assert json.loads(tf_env["TF_CONFIG"]) == {"cluster": {"worker": cluster.workers},
                                               "task": {"type": "worker", "index": 1}}
    assert not set(launch_module.TORCHRUN_VARIABLES) & set(tf_env)
    budget = str(max(1, usable_cores() // 2))
    assert torch_env["OMP_NUM_THREADS"] == tf_env["OMP_NUM_THREADS"] == budget == str(thread_budget(spec))


def test_a_busy_master_port_is_replaced_by_a_free_one():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        spec = RunSpec(model="seed_cnn", backend="torch", nproc=2)
        cluster = local_cluster(spec, Launch(master_port=port))
        assert cluster.master_port != port and f"--master-port {port} was busy" in cluster.notes[0]
        assert len(set([cluster.master_port] + [int(w.split(":")[1]) for w in cluster.workers])) == 3
    free = local_cluster(spec, Launch(master_port=port))  # released: the user's port is used
    assert free.master_port == port and free.notes == []


def test_the_audit_compares_data_parallel_settings_only_where_reported():
    common = {"bn_epsilon": 1e-5}
    single = compare_settings({"torch": common, "tensorflow": common})
    assert "world_size" not in {row["setting"] for row in single}
    parallel = compare_settings({"torch": {**common, "world_size": 2, "bn_statistics": BN_PER_REPLICA},
                                 "tensorflow": {**common, "world_size": 2, "bn_statistics": "synchronized"}})
    flagged = {row["setting"] for row in parallel if row["asymmetry"]}
    assert "bn_statistics" in flagged and "world_size" not in flagged


def _result(backend: str, world: int, img_s: float, accuracies: list[float], hosts: list[str]) -> RunResult:
    epochs = [{"epoch": i + 1, "test_accuracy": a, "wall_s": 10.0 * (i + 1)} for i, a in enumerate(accuracies)]
    return RunResult(run_id=f"m__{backend}__seed0__world{world}", model="resnet20", backend=backend, seed=0,
                     world_size=world, train_images_per_sec=img_s, test_accuracy=accuracies[-1], epochs=epochs,
                     spec={"recipe": {"batch_size": 64}}, distributed={"hosts": hosts} if world > 1 else {},
                     manifest={"hostname": hosts[0]})


def test_scaling_table_speedup_efficiency_time_to_target_and_ratio():
    results = [_result("torch", 1, 100.0, [0.3, 0.6], ["h"]), _result("torch", 2, 150.0, [0.5, 0.7], ["h", "h"]),
               _result("tensorflow", 1, 110.0, [0.3, 0.4], ["h"]),
               _result("tensorflow", 2, 180.0, [0.2, 0.55], ["h", "h"])]
    table = scaling_table(results, target_accuracy=0.5).set_index(["backend", "world_size"])
    assert table.loc[("torch", 2), "speedup"] == pytest.approx(1.5)
    assert table.loc[("torch", 2), "efficiency"] == pytest.approx(0.75)
    assert table.loc[("tensorflow", 2), "tf_over_torch"] == pytest.approx(1.2)
    assert table.loc[("torch", 1), "time_to_target_s"] == 20.0 and table.loc[("torch", 2), "time_to_target_s"] == 10.0
    assert np.isnan(table.loc[("tensorflow", 1), "time_to_target_s"])  # never reached 50%
    assert table.loc[("torch", 2), "global_batch"] == 128 and table.loc[("torch", 2), "hosts"] == 1
    assert "ran on one host (h)" in shared_host_note(results)
    assert shared_host_note(results[:1] + [_result("torch", 2, 150.0, [0.5], ["h", "g"])]) is None


# -- the launcher, with the fake backend ------------------------------------------------------------


@pytest.mark.parametrize("extra, expected", [
    (["--nproc", "0"], "--nproc takes positive integers"),
    (["--nproc", "2,2"], "--nproc lists 2 twice"),
    (["--nnodes", "2", "--node-rank", "2", "--master-addr", "h", "--master-port", "1"], "fix --node-rank"),
    (["--nnodes", "2"], "needs --master-addr HOST --master-port PORT"),
    (["--nnodes", "2", "--master-addr", "h", "--master-port", "1", "--checkpoint"], "drop --checkpoint"),
    (["--nproc", "4", "--data", "synthetic:64,32", "--batch-size", "32"], "lower --batch-size or --nproc"),
    (["--collective-timeout", "0"], "fix --collective-timeout"),
    (["--target-accuracy", "80"], "--target-accuracy is a fraction"),
    (["--lr-scaling", "sqrt"], "invalid choice"),
])
def test_bad_data_parallel_input_exits_2_with_one_line(fake_env, tmp_path, capsys, extra, expected):
    assert run_cli("run", "--models", "seed_cnn", "--backends", "fakea", *extra, "--out", str(tmp_path / "o")) == 2
    assert expected in _error_line(capsys)
    assert launches(fake_env) == []


def test_nproc_starts_every_rank_and_only_rank_0_writes(fake_env, tmp_path):
    out = tmp_path / "out"
    assert fake_run(out, "--nproc", "2", backends="fakea") == 0
    row = rows(out)["seed_cnn__fakea__seed0__world2"]
    assert row["status"] == "ok" and row["world_size"] == 2 and row["engine"] == "fake (no collectives)"
    assert [r["rank"] for r in row["distributed"]["ranks"]] == [0, 1]
    assert row["distributed"]["global_batch_size"] == 64 and row["distributed"]["per_replica_batch_size"] == 32
    # images are counted per global batch: 256 images / (32 x 2) = 4 steps of 64
    assert row["epochs"][0]["images"] == 256
    assert launches(fake_env, "train").count("seed_cnn__fakea__seed0__world2") == 2  # one process per rank
    assert (out / "logs" / "seed_cnn__fakea__seed0__world2.rank1.log").exists()
    assert "seed_cnn (world 2)" in json.loads((out / "audit.json").read_text())["models"]


def test_a_rank_that_crashes_ends_the_group_and_is_blamed(fake_env, tmp_path, monkeypatch):
    monkeypatch.setattr(launch_module, "GRACE_S", 1.0)
    monkeypatch.setenv("DUALBENCH_FAKE_FAULT", "rank0:slow;rank1:segfault@2")
    out = tmp_path / "out"
    assert fake_run(out, "--nproc", "2", "--epochs", "50", backends="fakea") == 1
    row = rows(out)["seed_cnn__fakea__seed0__world2"]
    assert row["status"] == "crashed" and row["error"].startswith("rank 1 of 2 killed by SIGSEGV")
    assert row["stderr_tail"].startswith("[rank 1]") and "segmentation fault" in row["stderr_tail"]
    ranks = {r["rank"]: r for r in row["distributed"]["ranks"]}
    assert ranks[0]["killed_by_runner"] and not ranks[1]["killed_by_runner"]
    for pid in launch_pids(fake_env):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # every rank is gone


def test_a_port_taken_between_picking_and_binding_restarts_the_group(fake_env, tmp_path, monkeypatch):
    monkeypatch.setattr(launch_module, "GRACE_S", 1.0)
    monkeypatch.setattr(launch_module, "port_is_free", lambda port, host="127.0.0.1": True)  # it looked free
    monkeypatch.setenv("DUALBENCH_FAKE_FAULT", "*:bind")
    with socket.socket() as thief:
        thief.bind(("127.0.0.1", 0))
        port = thief.getsockname()[1]
        assert fake_run(tmp_path / "out", "--nproc", "2", "--master-port", str(port), backends="fakea") == 0
    row = rows(tmp_path / "out")["seed_cnn__fakea__seed0__world2"]
    assert row["status"] == "ok" and row["distributed"]["launch"]["attempts"] == 2
    assert row["distributed"]["launch"]["master_port"] != port


def test_scale_writes_the_scaling_table_plot_and_caveat(fake_env, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli("scale", "--models", "seed_cnn", "--backends", "fakea", "--nproc", "1,2",
                   "--target-accuracy", "0.2", *SMALL, "--out", str(out)) == 0
    assert "Scaling (all columns in scaling.csv)" in capsys.readouterr().out
    table = (out / "scaling.csv").read_text().splitlines()
    assert len(table) == 3 and table[0].startswith("model,backend,world_size")
    assert (out / "plots" / "scaling.png").exists()
    report = (out / "report.md").read_text()
    assert "## Scaling" in report and "not how the hardware scales" in report
    assert "curves_seed_cnn_world2.png" in report  # each configuration has its own figures


def test_scale_with_mid_epoch_evaluations_target_retrieval_and_tensorboard(fake_env, tmp_path):
    """`dualbench scale` with issue 16's flags: the chief's mid-epoch evaluations (global steps) feed the
    scaling table's time to target, which is the time-to-accuracy table's; retrieval runs per configuration
    (a world-2 run's weights embedded in one process, never compared with world 1's); TensorBoard keeps
    each world size in its own folder."""
    import pandas as pd

    out, tb = tmp_path / "out", tmp_path / "tb"
    assert run_cli("scale", "--models", "seed_cnn", "--backends", "fakea,fakeb", "--nproc", "1,2",
                   "--eval-every-steps", "3", "--target-accuracy", "0.05", "--retrieval", "--tensorboard", str(tb),
                   *SMALL, "--out", str(out)) == 0
    runs = rows(out)
    row = runs["seed_cnn__fakea__seed0__world2"]
    # 256 images / global batch 64 = 4 steps per epoch, 2 epochs: every 3 global steps and at epoch ends
    assert [e["step"] for e in row["evaluations"]] == [3, 4, 6, 8]
    assert [e["step"] for e in runs["seed_cnn__fakea__seed0"]["evaluations"]] == [3, 6, 8, 9, 12, 15, 16]
    first = next(e for e in row["evaluations"] if e["test_accuracy"] >= 0.05)
    scaling = pd.read_csv(out / "scaling.csv").set_index(["backend", "world_size"])
    assert scaling.loc[("fakea", 2), "time_to_target_s"] == pytest.approx(first["wall_s"])
    seeds = pd.read_csv(out / "time_to_accuracy.csv").set_index(["model", "backend"])
    assert seeds.loc[("seed_cnn (world 2)", "fakea"), "tta_s"] == pytest.approx(first["wall_s"])
    retrieval = json.loads((out / "retrieval.json").read_text())
    assert {(m["model"], m["backend"], m["status"]) for m in retrieval["metrics"]} == {
        (model, backend, "ok") for model in ("seed_cnn", "seed_cnn (world 2)") for backend in ("fakea", "fakeb")}
    assert sorted(a["model"] for a in retrieval["agreement"]) == ["seed_cnn"] * 2 + ["seed_cnn (world 2)"] * 2
    assert all(a["agrees"] for a in retrieval["agreement"])
    for folder in ("seed_cnn", "seed_cnn_world2"):
        for backend in ("fakea", "fakeb"):
            assert list((tb / folder / backend / "seed0").glob("events.out.tfevents.*")), (folder, backend)


def test_two_hosts_meet_and_host_0_records_every_rank(fake_env, tmp_path):
    port = launch_module.free_ports(1)[0]
    hosts = ["--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(port)]
    args = ["run", "--models", "seed_cnn", "--backends", "fakea", *SMALL, *hosts]
    follower = subprocess.Popen([sys.executable, "-m", "compare", *args, "--node-rank", "1",
                                 "--out", str(tmp_path / "host1")], cwd=PROJECT_ROOT,
                                env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert run_cli(*args, "--node-rank", "0", "--out", str(tmp_path / "host0")) == 0
        output, _ = follower.communicate(timeout=120)
    finally:
        follower.kill()
    assert follower.returncode == 0, output
    row = rows(tmp_path / "host0")["seed_cnn__fakea__seed0__world2"]
    assert row["status"] == "ok" and [r["exit_code"] for r in row["distributed"]["ranks"]] == [0, 0]
    assert not (tmp_path / "host1" / "runs.jsonl").exists()  # only host 0 writes results
    assert (tmp_path / "host1" / "logs" / "seed_cnn__fakea__seed0__world2.rank1.log").exists()
