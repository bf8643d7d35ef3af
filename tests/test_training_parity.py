"""Training parity across frameworks: same batches, same updates, same BN statistics.

Both backends run in this process (conftest imports torch and triton first).
Every comparison is a real number against a real tolerance.
"""
import dataclasses
import shutil

import numpy as np
import pytest

from common.architectures import arch_spec
from common.config import Recipe, RunSpec
from common.data import Dataset
from common.init import initial_weights
from common.registry import get_backend
from common.sampler import epoch_plan, plan_batch_reference
from common.schedules import lr_at
from common.step_parity import case_arch, case_recipe
from compare.step_parity import (CASES, STEP_TOLERANCE, failures, make_case, run_cases, step_rows, trajectory_rows,
                                 update_rule_rel)


def tiny_dataset(n_train=96, n_test=40, seed=0) -> Dataset:
    rng = np.random.default_rng(seed)
    return Dataset(spec="test", train_images=rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
                   train_labels=rng.integers(0, 10, n_train).astype(np.int64),
                   test_images=rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
                   test_labels=rng.integers(0, 10, n_test).astype(np.int64),
                   class_names=tuple(f"c{i}" for i in range(10)), fingerprint="test", from_cache=False)


def _setup(model, recipe, dataset, in_shape=(32, 32, 3)):
    sides = {}
    arch = arch_spec(model, 10, in_shape)
    weights = initial_weights(arch, recipe.init_scheme, seed=0)
    for name in ("torch", "tensorflow"):
        spec = RunSpec(model=model, backend=name, device="cpu", threads=2, deterministic=True,
                       mode="eager" if name == "torch" else "graph", recipe=recipe)
        backend = get_backend(name)
        backend.setup(spec)
        net = backend.build_model(model, 10, in_shape, bn_momentum=recipe.bn_momentum,
                                  bn_epsilon=recipe.bn_epsilon)
        backend.set_weights(net, weights)
        backend.attach_data(dataset, spec)
        sides[name] = (backend, net, backend.make_train_step(net, spec))
    return sides


def test_first_batches_are_identical_across_pipelines():
    dataset = tiny_dataset()
    recipe = Recipe(batch_size=32, drop_last=False)
    sides = _setup("seed_cnn", recipe, dataset)
    plan = epoch_plan(3, 1, len(dataset.train_labels), 32, drop_last=False)
    raw, normalised = {}, {}
    for name, (backend, _, _) in sides.items():
        raw[name] = [(backend.to_numpy(x), backend.to_numpy(y)) for x, y in backend.train_batches(plan, raw=True)]
        normalised[name] = [backend.to_numpy(x) for x, _ in backend.train_batches(plan)]
    assert len(raw["torch"]) == len(raw["tensorflow"]) == plan.num_batches == 3
    for b, ((xt, yt), (xk, yk)) in enumerate(zip(raw["torch"], raw["tensorflow"])):
        assert xt.dtype == xk.dtype == np.uint8
        assert np.array_equal(xt, xk) and np.array_equal(xt, plan_batch_reference(dataset.train_images, plan, b))
        assert np.array_equal(yt, yk)
    for xt, xk in zip(normalised["torch"], normalised["tensorflow"]):
        xt = xt.transpose(0, 2, 3, 1) if xt.shape[1] == 3 else xt  # torch NCHW -> NHWC
        np.testing.assert_allclose(xt, xk, rtol=0, atol=1e-6)


# --- per-step training parity (compare.step_parity) ---------------------------------------------------

# Two cases with one side's semantics deliberately wrong (3 steps each): the comparison must fail, and on the
# right criterion. They run in the same three worker processes as the real cases.
BROKEN = {
    "broken_tf_no_label_smoothing": ("resnet20_8px_sgd", {"tensorflow": {"label_smoothing": 0.0}}),
    "broken_tf_decoupled_decay": ("resnet20_8px_sgd", {"tensorflow": {"weight_decay_mode": "decoupled"}}),
}


def _cases():
    names = [n for n in CASES if shutil.which("g++") or CASES[n]["modes"]["torch"] != "compile"]
    cases = [make_case(n) for n in names]
    cases += [make_case(base, steps=3, name=name, overrides=overrides) for name, (base, overrides) in BROKEN.items()]
    return cases


@pytest.fixture(scope="module")
def step_parity():
    cases = _cases()
    return {c["name"]: c for c in cases}, run_cases(cases)


@pytest.mark.slow
def test_every_step_matches_from_the_same_state(step_parity):
    """Each framework makes the other's step from the other's state: loss, gradients (slots), BN
    statistics and the update rule agree, for every case, step and direction (10 steps, one-cycle LR)."""
    cases, results = step_parity
    report = []
    for name, case in cases.items():
        if name in BROKEN:
            continue
        rows = step_rows(case, results[name])
        assert len(rows) == 2 * case["steps"] and len({r["lr"] for r in rows}) == case["steps"]
        worst = {k: max(r[k] for r in rows) for k in ("update_rule_rel", "grad_rel", "loss_rel", "bn_rel")}
        report.append(f"{name}: " + " ".join(f"{k}={v:.1e}" for k, v in worst.items()))
        assert not failures(case, rows), failures(case, rows)[:5]
    print("\n".join(report))  # the measured worst per case (pytest -s shows it)
    assert any(c["modes"]["tensorflow"] == "xla" for c in cases.values()) or not shutil.which("g++")


@pytest.mark.slow
@pytest.mark.parametrize("name,criterion", [("broken_tf_no_label_smoothing", "loss_rel"),
                                            ("broken_tf_decoupled_decay", "update_rule_rel")])
def test_a_side_with_wrong_semantics_fails_on_the_right_criterion(step_parity, name, criterion):
    cases, results = step_parity
    found = failures(cases[name], step_rows(cases[name], results[name]))
    assert any(criterion in reason for reason in found), found[:5]


@pytest.mark.slow
@pytest.mark.parametrize("wrong", [{"lr_scale": 1.01}, {"weight_decay_mode": "decoupled"}, {"nesterov": False}])
def test_update_rule_check_sees_small_semantic_errors(step_parity, wrong):
    """On real states, a reference with a 1% different LR, the other decay mode or no Nesterov
    misses the update-rule criterion at least 10x, while the right one passes (0 beyond rounding)."""
    cases, results = step_parity
    case = cases["resnet20_8px_sgd"]
    states, _ = results["resnet20_8px_sgd"]["free"]["tensorflow"]
    names = case_arch(case).trainable_names()
    recipe = case_recipe(case)
    wrong = dict(wrong)
    scale = wrong.pop("lr_scale", 1.0)
    bad = dataclasses.replace(recipe, **wrong)
    for k in range(1, case["steps"]):
        lr = lr_at(recipe, k, case["steps"])
        assert update_rule_rel(states[k], states[k + 1], recipe, lr, names) <= STEP_TOLERANCE["update_rule_rel"]
    worst = max(update_rule_rel(states[k], states[k + 1], bad, lr_at(recipe, k, case["steps"]) * scale, names)
                for k in range(1, case["steps"]))
    assert worst > 10 * STEP_TOLERANCE["update_rule_rel"], worst


@pytest.mark.slow
def test_bn_criterion_fails_on_the_biased_running_variance(step_parity):
    """Keras's own BN updates the running variance with the biased batch variance. Rebuilt from real
    states (the same step with var*(n-1)/n, n = batch x H x W per channel), it misses the BN criterion."""
    cases, results = step_parity
    case = cases["resnet20_8px_sgd"]
    arch, recipe = case_arch(case), case_recipe(case)
    states, _ = results["resnet20_8px_sgd"]["free"]["torch"]
    rows = step_rows(case, results["resnet20_8px_sgd"])
    assert max(r["bn_rel"] for r in rows) <= STEP_TOLERANCE["bn_rel"]
    worst = 0.0
    for k in range(case["steps"]):
        before, after = states[k], dict(states[k + 1])
        for layer in (l for l in arch.layers if l.kind == "bn"):
            n = recipe.batch_size * layer.spatial[0] * layer.spatial[1]
            key = f"w/{layer.name}.moving_variance"
            unbiased = before[key] + (after[key] - before[key]) / recipe.bn_momentum  # the batch variance used
            after[key] = (after[key] - recipe.bn_momentum * unbiased / n).astype(np.float32)  # biased instead
        buffers = [f"w/{n}" for n in arch.buffer_names()]
        moved = np.concatenate([(states[k + 1][b] - before[b]).ravel() for b in buffers]).astype(np.float64)
        diff = np.concatenate([(after[b] - states[k + 1][b]).ravel() for b in buffers]).astype(np.float64)
        worst = max(worst, np.linalg.norm(diff) / np.linalg.norm(moved))
    assert worst > 10 * STEP_TOLERANCE["bn_rel"], worst


@pytest.mark.slow
def test_free_runs_are_reported_not_judged(step_parity):
    """The two free-running trajectories are a figure (how far fp32 noise carries), kept for the report."""
    cases, results = step_parity
    rows = trajectory_rows(cases["resnet20_32px_sgd"], results["resnet20_32px_sgd"])
    assert [r["step"] for r in rows] == list(range(10))
    assert all(np.isfinite(r["weights_rel"]) and r["weights_rel"] < 1 for r in rows)


def test_optimizer_state_round_trip_continues_identically():
    """Saving and loading optimizer slots + weights mid-training gives the same next step (resume)."""
    recipe = Recipe(optimizer="sgd", lr=0.05, epochs=1, batch_size=16, schedule="constant")
    dataset = tiny_dataset(n_train=48)
    plan = epoch_plan(0, 0, 48, 16)
    for name, (backend, net, step) in _setup("resnet20", recipe, dataset).items():
        batches = list(backend.train_batches(plan))
        step(*batches[0], 0.05)
        saved_weights, saved_state = backend.get_weights(net), step.optimizer_state()
        step(*batches[1], 0.05)
        continued = backend.get_weights(net)
        backend.set_weights(net, saved_weights)
        fresh = backend.make_train_step(net, RunSpec(model="resnet20", backend=name, device="cpu", recipe=recipe))
        fresh.load_optimizer_state(saved_state)
        fresh(*batches[1], 0.05)
        resumed = backend.get_weights(net)
        for key in continued:
            np.testing.assert_allclose(resumed[key], continued[key], rtol=1e-6, atol=1e-7, err_msg=f"{name} {key}")
