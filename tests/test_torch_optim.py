"""torch_impl.optim: the torch optimizers against common.optim_reference, resume, precision, compile."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from common.config import Recipe
from common.init import initial_weights
from common.optim_reference import ReferenceOptimizer
from tests.torch_helpers import cpu_spec, rel_diff
from torch_impl.backend import Backend
from torch_impl.weights import canonical_variables
from common.weights import from_torch

SHAPE = (8, 8, 3)  # small images: real resnet20 gradients at little cost
LRS = [0.1, 0.03, 0.2, 0.01, 0.08]  # a changing learning rate, one per step
TOLERANCE = 2e-6  # float32 torch vs float64 reference, relative to the tensor's largest magnitude

CASES = {
    "sgd_nesterov_coupled": {},
    "sgd_nesterov_decoupled_kernels_only": {"weight_decay_mode": "decoupled", "decay_bn_and_bias": False},
    "sgd_heavy_ball_coupled_kernels_only": {"nesterov": False, "decay_bn_and_bias": False},
    "sgd_no_momentum_decoupled": {"momentum": 0.0, "weight_decay_mode": "decoupled"},
    # Coupled L2 can cancel g + wd*w to ~1e-8 for single elements; Adam then amplifies the float32
    # rounding of that sum by lr/eps. A larger eps keeps the float32-vs-float64 gap at rounding level
    # (and makes the eps placement matter more).
    "adam_coupled": {"optimizer": "adam", "adam_epsilon": 1e-3},
    "adam_decoupled_kernels_only": {"optimizer": "adam", "weight_decay_mode": "decoupled", "decay_bn_and_bias": False},
    "adamw_decoupled": {"optimizer": "adamw", "weight_decay_mode": "decoupled", "adam_beta1": 0.8},
    "adamw_coupled_no_decay": {"optimizer": "adamw", "weight_decay": 0.0},
}


def _setup(recipe: Recipe, model="resnet20", precision="fp32", mode="eager", seed=0):
    spec = cpu_spec(model, recipe=recipe, precision=precision, mode=mode)
    backend = Backend()
    backend.setup(spec)
    net = backend.build_model(model, 10, SHAPE, recipe.bn_momentum, recipe.bn_epsilon)
    backend.set_weights(net, initial_weights(net.arch_spec, "torch_default", seed))
    return backend, net, backend.make_train_step(net, spec)


def _batch(step: int, n: int = 8):
    rng = np.random.default_rng(100 + step)
    images = torch.from_numpy(rng.normal(size=(n, SHAPE[2], SHAPE[0], SHAPE[1])).astype(np.float32))
    return images, torch.from_numpy(rng.integers(0, 10, n).astype(np.int64))


def _grads(net) -> dict[str, np.ndarray]:
    """The gradients the last step used, canonical layout."""
    spec = net.arch_spec
    tensors = canonical_variables(net, spec)
    return {n: from_torch(tensors[n][0], tensors[n][1], tensors[n][2].grad.detach().numpy())
            for n in spec.trainable_names()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_k_steps_match_the_reference_optimizer(case):
    recipe = Recipe(**{"weight_decay": 0.05, **CASES[case]})
    scale = 0.1 if recipe.optimizer != "sgd" else 1.0
    backend, net, step = _setup(recipe)
    names = net.arch_spec.trainable_names()
    start = backend.get_weights(net)
    reference, params = ReferenceOptimizer(recipe), {n: start[n].astype(np.float64) for n in names}
    wrong_mode = "coupled_l2" if recipe.weight_decay_mode == "decoupled" else "decoupled"
    wrong = ReferenceOptimizer(Recipe(**{**recipe.__dict__, "weight_decay_mode": wrong_mode,
                                         "decay_bn_and_bias": not recipe.decay_bn_and_bias}))
    wrong_params = dict(params)
    for index, lr in enumerate(LRS):
        loss, correct = step(*_batch(index), lr * scale)
        assert np.isfinite(backend.to_numpy(loss)) and 0 <= int(backend.to_numpy(correct)) <= 8
        grads = _grads(net)
        params = reference.step(params, grads, lr * scale)
        wrong_params = wrong.step(wrong_params, grads, lr * scale)
        current = backend.get_weights(net)
        for name in names:
            assert rel_diff(current[name], params[name]) <= TOLERANCE, (index, name)
    state = step.optimizer_state()
    assert int(state["step"]) == len(LRS)
    slot_names = {"sgd": ["momentum"] if recipe.momentum else []}.get(recipe.optimizer, ["m", "v"])
    assert set(state) == {"step"} | {f"{s}/{n}" for s in slot_names for n in names}
    for slot in slot_names:
        for name in names:
            assert rel_diff(state[f"{slot}/{name}"], reference.slots[name][slot]) <= TOLERANCE, (slot, name)
    if recipe.weight_decay > 0:  # the test can tell the decay semantics apart
        assert max(rel_diff(current[n], wrong_params[n]) for n in names) > 100 * TOLERANCE


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_resumed_run_equals_uninterrupted_run(optimizer):
    recipe = Recipe(optimizer=optimizer, lr=0.01, weight_decay=0.01,
                    weight_decay_mode="decoupled" if optimizer == "adamw" else "coupled_l2")
    backend, net, step = _setup(recipe)
    for index, lr in enumerate(LRS):
        step(*_batch(index), lr * 0.1)
    uninterrupted = backend.get_weights(net)

    backend, net, step = _setup(recipe)
    for index, lr in enumerate(LRS[:3]):
        step(*_batch(index), lr * 0.1)
    weights, state = backend.get_weights(net), step.optimizer_state()
    backend, net, step = _setup(recipe, seed=7)  # different start: everything must come from the checkpoint
    backend.set_weights(net, weights)
    step.load_optimizer_state(state)
    assert int(step.optimizer_state()["step"]) == 3
    for index, lr in enumerate(LRS[3:], start=3):
        step(*_batch(index), lr * 0.1)
    resumed = backend.get_weights(net)
    for name, value in uninterrupted.items():
        np.testing.assert_allclose(resumed[name], value, rtol=1e-6, atol=1e-7, err_msg=name)


def test_loss_uses_label_smoothing_and_is_float32():
    recipe = Recipe(label_smoothing=0.1)
    backend, net, step = _setup(recipe)
    images, labels = _batch(0)
    logits = backend.predict(net, images.permute(0, 2, 3, 1).numpy(), training=True)
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    target = np.full_like(log_probs, 0.1 / 10)
    target[np.arange(8), labels.numpy()] += 0.9
    loss, correct = step(images, labels, 0.0)
    assert loss.dtype == torch.float32
    assert abs(float(loss) - float(-(target * log_probs).sum(axis=1).mean())) < 1e-5
    assert int(correct) == int((logits.argmax(axis=1) == labels.numpy()).sum())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_step_runs_and_tracks_fp32(precision):
    recipe = Recipe(lr=0.05)
    _, _, fp32_step = _setup(recipe)
    backend, net, step = _setup(recipe, precision=precision)
    images, labels = _batch(0)
    reference_loss = float(fp32_step(images, labels, 0.05)[0])
    losses = [float(step(*_batch(i % 2), 0.05)[0]) for i in range(3)]
    assert all(np.isfinite(losses))
    assert abs(losses[0] - reference_loss) < 0.05 * abs(reference_loss)
    assert all(np.isfinite(w).all() for w in backend.get_weights(net).values())
    audit = backend.audit(net, step)
    assert audit["precision"] == precision
    expected = "dynamic (initial scale 65536, growth interval 2000 steps)" if precision == "fp16" else None
    assert audit["loss_scaling"] == expected  # the initial scale, also after steps that backed it off
    assert ("loss_scale" in step.optimizer_state()) == (precision == "fp16")


def test_fp16_overflow_skips_the_whole_update_including_decoupled_decay():
    recipe = Recipe(weight_decay=0.1, weight_decay_mode="decoupled")
    backend, net, step = _setup(recipe, precision="fp16")
    step.scaler.load_state_dict({**step.scaler.state_dict(), "scale": 1e30})  # fp16 grads overflow
    before = backend.get_weights(net)
    step(*_batch(0), 0.1)
    after = backend.get_weights(net)
    for name in net.arch_spec.trainable_names():
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    assert step.scaler.get_scale() < 0.6e30  # the scaler backed off
    step.scaler.load_state_dict({**step.scaler.state_dict(), "scale": 1024.0})
    step(*_batch(1), 0.1)  # a finite step still decays and updates
    assert not np.array_equal(backend.get_weights(net)["stem.conv.kernel"], before["stem.conv.kernel"])


def test_compiled_step_matches_eager_and_never_recompiles_for_a_new_lr():
    recipe = Recipe(lr=0.05)
    compiled_backend, compiled_net, compiled = _setup(recipe, model="seed_cnn", mode="compile")
    eager_backend, eager_net, eager = _setup(recipe, model="seed_cnn")
    torch._dynamo.utils.counters.clear()
    for index, lr in enumerate(LRS):
        batch = _batch(index)
        compiled_loss, _ = compiled(*batch, lr * 0.1)
        eager_loss, _ = eager(*batch, lr * 0.1)
        assert abs(float(compiled_loss) - float(eager_loss)) < 1e-4 * max(1.0, abs(float(eager_loss)))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1, dict(torch._dynamo.utils.counters["stats"])
    compiled_weights, eager_weights = compiled_backend.get_weights(compiled_net), eager_backend.get_weights(eager_net)
    for name, value in eager_weights.items():
        assert rel_diff(compiled_weights[name], value) <= 1e-4, name
