"""tf_impl.optim against common.optim_reference: update rules, train step, retracing, state, precision."""
import contextlib
import dataclasses

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from common.config import Recipe  # noqa: E402
from common.init import initial_weights  # noqa: E402
from common.optim_reference import ReferenceOptimizer, decays  # noqa: E402
from tf_impl import weights as tf_weights  # noqa: E402
from tf_impl.models import create_model  # noqa: E402
from tf_impl.optim import TrainStep, softmax_cross_entropy  # noqa: E402

IN_SHAPE = (12, 12, 3)  # small images keep every step cheap; the architecture is shape-agnostic
LRS = [0.1, 0.05, 0.2, 0.01, 0.07]  # a changing LR: Keras's LR-folded momentum would diverge here
LR_FACTORS = [1.0, 0.5, 2.0, 0.1, 0.7]  # per-step multipliers of the recipe's peak LR

RECIPES = {
    "sgd_nesterov_coupled": Recipe(optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=5e-3),
    "sgd_momentum_decoupled_kernels_only": Recipe(optimizer="sgd", momentum=0.8, nesterov=False,
                                                  weight_decay=1e-2, weight_decay_mode="decoupled",
                                                  decay_bn_and_bias=False),
    "sgd_plain": Recipe(optimizer="sgd", momentum=0.0, nesterov=False, weight_decay=1e-3),
    "adam_coupled": Recipe(optimizer="adam", weight_decay=1e-3, adam_epsilon=1e-6, lr=1e-3),
    "adamw_decoupled_kernels_only": Recipe(optimizer="adamw", weight_decay=5e-2, adam_beta2=0.99,
                                           weight_decay_mode="decoupled", decay_bn_and_bias=False, lr=1e-3),
}


@contextlib.contextmanager
def dtype_policy(name):
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _model(name="resnet20", seed=0, in_shape=IN_SHAPE):
    model = create_model(name, 10, in_shape)
    tf_weights.set_weights(model, model.arch_spec, initial_weights(model.arch_spec, "torch_default", seed))
    return model


def _batch(n=8, seed=0, in_shape=IN_SHAPE):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *in_shape)).astype(np.float32), rng.integers(0, 10, n).astype(np.int64)


def _step(model, recipe, **kwargs):
    return TrainStep(model, model.arch_spec, recipe, **kwargs)


def _trainable(model):
    weights = tf_weights.get_weights(model, model.arch_spec)
    return {n: weights[n] for n in model.arch_spec.trainable_names()}


def _gradients(model, images, labels):
    """Canonical-name gradients at the current weights (batch statistics, model left unchanged)."""
    names = tf_weights.trainable_variable_names(model, model.arch_spec)
    with tf_weights.inference(model, training=True), tf.GradientTape() as tape:
        loss = softmax_cross_entropy(model(images, training=True), labels, 10)
    grads = tape.gradient(loss, model.trainable_variables)
    return float(loss), {n: g.numpy() for n, g in zip(names, grads)}


def _keras_semantics(recipe, params, grads, lrs):
    """What Keras's own SGD / Adam would do with the same gradients: the LR folded into the momentum
    buffer (v = m*v - lr*g), or epsilon added before Adam's bias correction. Decay as the reference."""
    params = {n: np.asarray(w, np.float64).copy() for n, w in params.items()}
    slots = {n: [np.zeros_like(w), np.zeros_like(w)] for n, w in params.items()}
    for t, lr in enumerate(lrs, start=1):
        for name, w in params.items():
            g = np.asarray(grads[name], np.float64)
            if decays(name, recipe):
                if recipe.weight_decay_mode == "coupled_l2":
                    g = g + recipe.weight_decay * w
                else:
                    w = w * (1.0 - lr * recipe.weight_decay)
            if recipe.optimizer == "sgd":
                v = slots[name][0] = recipe.momentum * slots[name][0] - lr * g
                w = w + (recipe.momentum * v - lr * g if recipe.nesterov else v)
            else:
                m = slots[name][0] = recipe.adam_beta1 * slots[name][0] + (1 - recipe.adam_beta1) * g
                v = slots[name][1] = recipe.adam_beta2 * slots[name][1] + (1 - recipe.adam_beta2) * g * g
                lr_t = lr * np.sqrt(1 - recipe.adam_beta2 ** t) / (1 - recipe.adam_beta1 ** t)
                w = w - lr_t * m / (np.sqrt(v) + recipe.adam_epsilon)
            params[name] = w
    return params


@pytest.mark.parametrize("recipe_name", list(RECIPES))
def test_update_rule_matches_reference_over_steps_with_changing_lr(recipe_name):
    recipe = RECIPES[recipe_name]
    model = _model()
    start = _trainable(model)
    _, grads = _gradients(model, *_batch())  # real gradients, computed once
    step = _step(model, recipe, mode="eager")
    reference = ReferenceOptimizer(recipe)
    params = dict(start)
    lrs = [recipe.lr * f for f in LR_FACTORS]
    for lr in lrs:
        step.inner_optimizer.learning_rate = lr
        step.optimizer.apply([tf.constant(grads[n]) for n in step.variable_names], step.variables)
        params = reference.step(params, grads, lr)
    got = _trainable(model)
    for name in params:
        np.testing.assert_allclose(got[name], params[name], rtol=2e-6, atol=1e-7, err_msg=name)
    # The comparison can tell semantics apart: references with other semantics end far from the step.
    other_mode = "coupled_l2" if recipe.weight_decay_mode == "decoupled" else "decoupled"
    wrong = {"decay": _replay(ReferenceOptimizer(dataclasses.replace(
        recipe, weight_decay_mode=other_mode, decay_bn_and_bias=not recipe.decay_bn_and_bias)), start, grads, lrs)}
    if recipe.optimizer != "sgd" or recipe.momentum > 0:  # plain SGD has no momentum/epsilon to misplace
        wrong["keras"] = _keras_semantics(recipe, start, grads, lrs)
    for label, other in wrong.items():
        assert max(rel_diff(got[n], other[n]) for n in got) > 100 * 2e-6, label
    state = step.optimizer_state()
    assert int(state["step"]) == len(LR_FACTORS)
    for name, slots in reference.slots.items():
        for slot, value in slots.items():
            # float32 sums of g + wd*w cancel: absolute tolerance scaled to the slot's magnitude
            np.testing.assert_allclose(state[f"{slot}/{name}"], value, rtol=1e-5,
                                       atol=1e-6 * np.abs(value).max(), err_msg=f"{slot}/{name}")
    expected_slots = {"sgd_plain": set()}.get(recipe_name, {"momentum"} if recipe.optimizer == "sgd" else {"m", "v"})
    assert {k.split("/")[0] for k in state if k != "step"} == expected_slots


def _replay(reference, params, grads, lrs):
    for lr in lrs:
        params = reference.step(params, grads, lr)
    return params


def rel_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def test_decay_flags_follow_decay_bn_and_bias():
    model = _model()
    recipe = RECIPES["adamw_decoupled_kernels_only"]
    step = _step(model, recipe)
    flags = dict(zip(step.variable_names, step.inner_optimizer.decay_flags))
    assert flags["stem.conv.kernel"] and flags["head.kernel"]
    assert not flags["head.bias"] and not flags["stem.bn.gamma"] and not flags["stem.bn.beta"]


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_train_step_matches_reference_with_real_gradients_each_step(mode):
    """Forward, loss, backward and update of the step vs eager gradients + the numpy reference.

    Realistic LRs: with LR 0.1 on this tiny net a channel's BN variance
    collapses after one step and amplifies float-level graph/eager
    differences (chaos, not semantics).
    """
    recipe = Recipe(optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=5e-3, label_smoothing=0.1)
    model = _model()
    step = _step(model, recipe, mode=mode)
    reference = ReferenceOptimizer(recipe)
    params = _trainable(model)
    for k, lr in enumerate([0.01, 0.005, 0.02, 0.003]):
        images, labels = _batch(seed=k)
        with tf_weights.inference(model, training=True), tf.GradientTape() as tape:
            want_loss = softmax_cross_entropy(model(images, training=True), labels, 10, 0.1)
        grads = dict(zip(step.variable_names, [g.numpy() for g in tape.gradient(want_loss, step.variables)]))
        loss, correct = step(tf.constant(images), tf.constant(labels), lr)
        assert abs(float(loss) - float(want_loss)) < 1e-5
        assert 0 <= int(correct) <= len(labels)
        params = reference.step(params, grads, lr)
        got = _trainable(model)
        for name in params:
            np.testing.assert_allclose(got[name], params[name], rtol=1e-5, atol=1e-6, err_msg=name)
        params = got  # the next reference step starts from the model's own (float32) weights
    assert step.trace_count == (1 if mode == "graph" else 4)


def test_changing_lr_never_retraces_and_partial_batches_retrace_once():
    model = _model("seed_cnn")
    step = _step(model, Recipe(), mode="graph")
    images, labels = _batch(8)
    for lr in LRS:
        step(images, labels, lr)
    assert step.trace_count == 1
    assert step.inner_optimizer.learning_rate.numpy() == np.float32(LRS[-1])
    for n in (5, 3, 8):  # the first new size retraces with a generic batch dimension, then no more
        step(images[:n], labels[:n], 0.01)
    assert step.trace_count == 2


def test_cross_entropy_with_label_smoothing_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 5)).astype(np.float32) * 3
    labels = rng.integers(0, 5, 6)
    for eps in (0.0, 0.2):
        target = np.eye(5)[labels] * (1 - eps) + eps / 5
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        want = -(target * log_probs).sum(axis=1).mean()
        got = softmax_cross_entropy(logits, labels, 5, eps)
        assert got.dtype == tf.float32
        np.testing.assert_allclose(float(got), want, rtol=1e-6)


@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_execution_modes_agree_with_graph(mode):
    results = {}
    for m in ("graph", mode):
        model = _model("resnet20", in_shape=(8, 8, 3))
        step = _step(model, RECIPES["sgd_nesterov_coupled"], mode=m)
        batches = [_batch(8, seed=k, in_shape=(8, 8, 3)) for k in range(2)]
        losses = [float(step(x, y, lr)[0]) for (x, y), lr in zip(batches, [0.01, 0.005])]
        results[m] = (losses, tf_weights.get_weights(model, model.arch_spec))
    np.testing.assert_allclose(results[mode][0], results["graph"][0], rtol=1e-5)
    for name, value in results["graph"][1].items():
        np.testing.assert_allclose(results[mode][1][name], value, rtol=1e-4, atol=1e-5, err_msg=name)


def test_optimizer_state_round_trip_resumes_exactly():
    recipe = RECIPES["adam_coupled"]
    batches = [_batch(8, seed=k) for k in range(4)]
    model = _model("seed_cnn")
    step = _step(model, recipe, mode="graph")
    for (x, y), lr in zip(batches[:2], LRS):
        step(x, y, lr)
    saved_weights, saved_state = tf_weights.get_weights(model, model.arch_spec), step.optimizer_state()
    assert int(saved_state["step"]) == 2 and saved_state["step"].shape == ()
    for (x, y), lr in zip(batches[2:], LRS[2:]):
        step(x, y, lr)
    uninterrupted = tf_weights.get_weights(model, model.arch_spec)

    resumed_model = _model("seed_cnn", seed=7)
    resumed = _step(resumed_model, recipe, mode="graph")
    tf_weights.set_weights(resumed_model, resumed_model.arch_spec, saved_weights)
    resumed.load_optimizer_state(saved_state)
    for (x, y), lr in zip(batches[2:], LRS[2:]):
        resumed(x, y, lr)
    final = tf_weights.get_weights(resumed_model, resumed_model.arch_spec)
    for name, value in uninterrupted.items():
        np.testing.assert_allclose(final[name], value, rtol=1e-6, atol=1e-7, err_msg=name)
    with pytest.raises(ValueError, match="missing"):
        resumed.load_optimizer_state({"step": np.array(1)})


def test_bf16_step_trains_in_bfloat16_with_float32_weights():
    with dtype_policy("mixed_bfloat16"):
        model = _model("resnet20")
        step = _step(model, Recipe(), precision="bf16", mode="graph")
        assert step.loss_scaling is None
        images, labels = _batch()
        before = _trainable(model)
        assert model(images).dtype == tf.bfloat16
        loss, _ = step(images, labels, 0.05)
        assert loss.dtype == tf.float32 and np.isfinite(float(loss))
        after = _trainable(model)
        assert all(v.dtype == np.float32 for v in after.values())
        assert not np.array_equal(after["stem.conv.kernel"], before["stem.conv.kernel"])
        _, grads = _gradients(model, images, labels)
    with dtype_policy("float32"):
        fp32 = _model("resnet20")
        tf_weights.set_weights(fp32, fp32.arch_spec, tf_weights.get_weights(model, model.arch_spec))
        fp32_loss, _ = _gradients(fp32, images, labels)
        bf16_loss = float(softmax_cross_entropy(model(images, training=True), labels, 10))
    assert abs(bf16_loss - fp32_loss) < 0.05  # bf16 has ~3 significant digits


def test_fp16_dynamic_loss_scaling_skips_non_finite_steps():
    with dtype_policy("mixed_float16"):
        model = _model("seed_cnn")
        step = _step(model, Recipe(), precision="fp16", mode="graph")
        assert step.loss_scaling == "dynamic"
        images, labels = _batch()
        loss, _ = step(images, labels, 0.05)
        assert np.isfinite(float(loss))
        state = step.optimizer_state()
        assert float(state["loss_scale"]) == 2.0 ** 16 and int(state["step"]) == 1
        before = _trainable(model)
        step.optimizer.dynamic_scale.assign(2.0 ** 100)  # fp16 gradients overflow to inf
        step(images, labels, 0.05)
        state = step.optimizer_state()
        assert float(state["loss_scale"]) == 2.0 ** 99  # halved
        assert int(state["step"]) == 1  # the update was skipped, as torch's GradScaler does
        after = _trainable(model)
        assert all(np.array_equal(before[k], after[k]) for k in before)


def test_compiled_step_updates_bn_moving_statistics_once_per_step():
    """stem.bn's moving statistics after K graph-mode train steps, from numpy and the stem.conv outputs."""
    model = _model()
    step = _step(model, Recipe(bn_momentum=0.1), mode="graph")
    mean, var = np.zeros(16), np.ones(16)
    for k in range(3):
        images, labels = _batch(seed=k)
        conv = tf_weights.layer_outputs(model, model.arch_spec, images, training=True)["stem.conv"]
        n = conv.shape[0] * conv.shape[1] * conv.shape[2]
        mean = 0.9 * mean + 0.1 * conv.mean(axis=(0, 1, 2), dtype=np.float64)
        var = 0.9 * var + 0.1 * conv.var(axis=(0, 1, 2), dtype=np.float64) * n / (n - 1)
        step(images, labels, 0.01)
    weights = tf_weights.get_weights(model, model.arch_spec)
    np.testing.assert_allclose(weights["stem.bn.moving_mean"], mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(weights["stem.bn.moving_variance"], var, rtol=1e-4, atol=1e-6)
