"""Data-parallel semantics, the same on both engines (torch DDP, tf.distribute MultiWorkerMirroredStrategy).

* shards: replica r gets the same bytes (images, crops, flips) in torch and TensorFlow, and the
  replicas' shards of a step are exactly that step's global batch;
* mean gradients: N = 2 replicas with per-replica batch b train exactly like one process with
  batch 2b (seed_cnn: no BatchNorm), in each framework;
* per-replica BatchNorm: torch DDP and TF MultiWorkerMirroredStrategy make the same step from
  the same state, replica by replica: loss, update rule, gradients and every BN layer's statistics.

The data-parallel runs are real launches of 2 ranks per framework (compare.launch, the runner's
launcher), shared by the tests of this module.
"""
from __future__ import annotations

import numpy as np
import pytest

from common.registry import get_backend
from common.sampler import epoch_plan, plan_batch_reference, shard_plan
from common.step_parity import free_run, learnable_dataset
from compare.step_parity import CASES, failures, make_case, run_cases, step_rows

STEPS = 3
WORLD = 2
PER_REPLICA = 16
# no weight decay: a gradient scaled by c is then exactly an LR scaled by c (SGD with momentum is linear
# in the gradient), so the discriminators below can stand for a double division (x 1/2) or a sum (x 2)
_SEED_CNN = {**CASES["seed_cnn_16px_sgd"]["recipe"], "weight_decay": 0.0}
# TensorFlow eager: a handful of steps costs less than tracing strategy.run (the graph path runs in real runs)
MODES = {"torch": "eager", "tensorflow": "eager"}
TRAJECTORY_TOLERANCE = 2e-5  # relative, weights and loss after each of STEPS steps (fp32 summation order)


def _case(base: str, recipe: dict, **changes) -> dict:
    return make_case(base, steps=STEPS, recipe=recipe, modes=MODES, **{"threads": 1, **changes})


DISTRIBUTED_CASES = [
    _case("resnet20_8px_sgd", {**CASES["resnet20_8px_sgd"]["recipe"], "batch_size": PER_REPLICA}, nproc=WORLD,
          name="resnet20_8px_sgd_world2", collective_timeout_s=120),
    _case("seed_cnn_16px_sgd", {**_SEED_CNN, "batch_size": PER_REPLICA}, nproc=WORLD,
          name="seed_cnn_16px_sgd_world2", collective_timeout_s=120, replay=False),
]


@pytest.fixture(scope="module")
def world2():
    """Both cases, 2 ranks per framework: free runs, and each side's replay of the other's states."""
    return run_cases(DISTRIBUTED_CASES, timeout=600)


def _trajectory_gap(a: tuple, b: tuple) -> float:
    """Worst relative difference of the weights after each step and of each step's loss, over two free runs."""
    (states_a, losses_a), (states_b, losses_b) = a, b
    worst = 0.0
    for k in range(1, STEPS + 1):
        keys = [key for key in states_a[k] if key.startswith("w/")]
        wa = np.concatenate([states_a[k][key].ravel() for key in keys]).astype(np.float64)
        wb = np.concatenate([states_b[k][key].ravel() for key in keys]).astype(np.float64)
        worst = max(worst, float(np.linalg.norm(wa - wb) / np.linalg.norm(wa)))
    losses = np.abs(np.subtract(losses_a, losses_b)) / np.abs(losses_a)
    return max(worst, float(losses.max()))


# -- shards ------------------------------------------------------------------------------------


def test_shards_split_every_global_batch_and_are_the_same_bytes_in_both_frameworks():
    torch_data = pytest.importorskip("torch_impl.data")
    import torch

    from tf_impl import data as tf_data

    data = learnable_dataset(8, 96, seed=3)
    plan = epoch_plan(seed=5, epoch=1, num_examples=96, batch_size=3 * 8)  # global batch 24 = 3 x 8
    pipelines = {
        "torch": torch_data.TrainPipeline(data.train_images, data.train_labels, torch.device("cpu"),
                                          crop_padding=4, mean=(0.5,) * 3, std=(0.25,) * 3, channels_last=False),
        "tensorflow": tf_data.TrainPipeline(data.train_images, data.train_labels, "/CPU:0", crop_padding=4,
                                            mean=(0.5,) * 3, std=(0.25,) * 3),
    }
    shards = {name: [[(np.asarray(x), np.asarray(y)) for x, y in p.batches(shard_plan(plan, rank, 3), raw=True)]
                     for rank in range(3)] for name, p in pipelines.items()}
    for step in range(plan.num_batches):
        start, stop = plan.batch_bounds()[step]
        whole = plan_batch_reference(data.train_images, plan, step)
        labels = data.train_labels[plan.order[start:stop]]
        for name in pipelines:
            images = np.concatenate([shards[name][rank][step][0] for rank in range(3)])
            assert images.tobytes() == whole.tobytes(), f"{name}: step {step}'s shards are not its global batch"
            assert np.array_equal(np.concatenate([shards[name][rank][step][1] for rank in range(3)]), labels)
        for rank in range(3):  # replica r: the same bytes in torch and in TensorFlow
            assert shards["torch"][rank][step][0].tobytes() == shards["tensorflow"][rank][step][0].tobytes()
    # the check can fail: another rank's shard (or an interleaved split) is not this slice
    assert shards["torch"][1][0][0].tobytes() != plan_batch_reference(data.train_images, plan, 0)[:8].tobytes()


# -- mean gradients ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_two_replicas_of_batch_b_train_like_one_process_of_batch_2b(world2, backend):
    distributed = world2["seed_cnn_16px_sgd_world2"]["free"][backend]  # rank 0's (weights agree across ranks)
    single_case = _case("seed_cnn_16px_sgd", {**_SEED_CNN, "batch_size": WORLD * PER_REPLICA}, threads=2)
    single = free_run(get_backend(backend), single_case)
    gap = _trajectory_gap(single, distributed)
    print(f"{backend}: 2 x {PER_REPLICA} vs 1 x {WORLD * PER_REPLICA}: worst relative difference {gap:.2e}")
    assert gap <= TRAJECTORY_TOLERANCE
    rank1 = world2["seed_cnn_16px_sgd_world2"]["ranks"][1]["free"][backend]
    assert _trajectory_gap(distributed, rank1) <= TRAJECTORY_TOLERANCE  # the replicas hold the same weights
    # The comparison sees the usual mistakes: gradients summed instead of averaged (= LR x 2) or
    # divided by the replica count twice (= LR / 2, e.g. on top of a Keras loss's own scaling).
    for factor in (2.0, 0.5):
        wrong = _case("seed_cnn_16px_sgd", {**_SEED_CNN, "batch_size": WORLD * PER_REPLICA,
                                            "lr": _SEED_CNN["lr"] * factor}, threads=2)
        assert _trajectory_gap(free_run(get_backend(backend), wrong), distributed) > 10 * TRAJECTORY_TOLERANCE


# -- DDP against MultiWorkerMirroredStrategy, step by step --------------------------------------------


@pytest.mark.slow
def test_ddp_and_multiworker_mirrored_make_the_same_step_on_every_replica(world2):
    case = DISTRIBUTED_CASES[0]
    for rank, result in enumerate(world2[case["name"]]["ranks"]):
        rows = step_rows(case, result)
        assert len(rows) == 2 * STEPS
        assert failures(case, rows) == [], f"rank {rank}"
        worst = {key: max(row[key] for row in rows) for key in ("loss_rel", "bn_rel", "update_rule_rel", "grad_rel")}
        print(f"rank {rank}: worst per criterion {worst}")
    # Replica-local BN statistics really differ between replicas, so a framework that used replica 0's
    # on replica 1 (DDP's default buffer broadcast) would fail the BN criterion on rank 1.
    ranks = world2[case["name"]]["ranks"]
    mixed = {"free": ranks[0]["free"], "replay": ranks[1]["replay"]}
    assert any("bn_rel" in reason for reason in failures(case, step_rows(case, mixed)))
