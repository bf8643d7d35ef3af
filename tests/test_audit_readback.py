"""The fairness audit reads back what was built, on both real backends, and catches a one-sided break.

Both backends are built in this process (torch first: tests/conftest.py) with
the same recipe; their audits must agree on every must-match setting. Then one
built object on ONE side is changed after the build (a param group's weight
decay, one BN layer's epsilon, the Keras optimizer's beta, the dropout layer's
rate, the loss object's label smoothing, the eval pipeline's batch size...) and
the comparison must flag exactly the settings that change: an audit that
echoed the recipe would see nothing.
"""
from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
torch = pytest.importorskip("torch")

from common.audit import MUST_MATCH, asymmetries, compare_settings  # noqa: E402
from common.config import Recipe, RunSpec  # noqa: E402
from common.worker import common_settings  # noqa: E402
from tests.torch_helpers import tiny_dataset  # noqa: E402
from tf_impl.backend import Backend as TFBackend  # noqa: E402
from torch_impl.backend import Backend as TorchBackend  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
IN_SHAPE = (16, 16, 3)
MODEL = "mobilenet_v2"  # BN, biases and a dropout layer: every audited kind of layer
RECIPES = {
    # kernels decay, BN and biases do not: two torch param groups, mixed Keras decay flags
    "adamw": Recipe(optimizer="adamw", weight_decay=5e-4, weight_decay_mode="decoupled", decay_bn_and_bias=False,
                    adam_beta2=0.99, adam_epsilon=1e-7, label_smoothing=0.1, dropout=0.3, eval_batch_size=8,
                    batch_size=8, epochs=1),
    "sgd": Recipe(optimizer="sgd", momentum=0.8, nesterov=True, weight_decay=1e-3, eval_batch_size=4,
                  batch_size=8, epochs=1),
}
SIDES = {"torch": (TorchBackend, {"mode": "eager", "channels_last": False}),
         "tensorflow": (TFBackend, {"mode": "graph"})}


def _build(side: str, recipe: Recipe, precision: str = "fp32", model: str = MODEL) -> dict:
    cls, extra = SIDES[side]
    spec = RunSpec(model=model, backend=side, device="cpu", threads=2, precision=precision, recipe=recipe,
                   **extra)
    data = tiny_dataset(n_train=16, n_test=10, shape=IN_SHAPE)
    backend = cls()
    backend.setup(spec)
    net = backend.build_model(model, 10, IN_SHAPE, recipe.bn_momentum, recipe.bn_epsilon, recipe.dropout)
    backend.attach_data(data, spec)
    return {"backend": backend, "model": net, "step": backend.make_train_step(net, spec), "spec": spec,
            "data": data}


def _settings(built: dict) -> dict:
    return {**built["backend"].audit(built["model"], built["step"]), **common_settings(built["spec"], built["data"])}


def _flagged(sides: dict) -> set[str]:
    return {row["setting"] for row in asymmetries(compare_settings({s: _settings(b) for s, b in sides.items()}))}


@pytest.fixture(scope="module")
def built_sides():
    """recipe name -> {side: built objects}, built once per module (breaks are undone by monkeypatch)."""
    import keras

    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            cache[name] = {side: _build(side, RECIPES[name]) for side in SIDES}
        return cache[name]

    yield get
    keras.mixed_precision.set_global_policy("float32")


def _baseline_ok(flagged: set[str], sides: dict) -> None:
    # In one test process TF's thread pools may already be fixed by an earlier test; the fallback
    # note then says so, and only that one row may differ.
    notes = " ".join(sides["tensorflow"]["backend"].fallback_notes())
    assert flagged in (set(), {"intra_op_threads"} if "threads stay" in notes else set()), flagged


@pytest.mark.parametrize("name", list(RECIPES))
def test_both_real_backends_report_every_must_match_setting_identically(built_sides, name):
    built = built_sides(name)
    _baseline_ok(_flagged(built), built)
    torch_settings, tf_settings = _settings(built["torch"]), _settings(built["tensorflow"])
    assert set(MUST_MATCH) <= set(torch_settings) and set(MUST_MATCH) <= set(tf_settings)
    recipe = RECIPES[name]
    for settings in (torch_settings, tf_settings):
        assert settings["eval_batch_size"] == recipe.eval_batch_size and settings["dropout"] == (recipe.dropout or 0.2)
        assert settings["decayed_param_count"] == len(settings["decayed_param_names"]) > 0
        if name == "adamw":
            assert (settings["adam_beta1"], settings["adam_beta2"], settings["optimizer_epsilon"]) == (0.9, 0.99, 1e-7)
            assert settings["decay_bn_and_bias"] is False and settings["label_smoothing"] == 0.1
            assert all(n.endswith(".kernel") for n in settings["decayed_param_names"])
        else:
            assert (settings["momentum"], settings["nesterov"], settings["adam_beta1"]) == (0.8, True, None)
            assert settings["decay_bn_and_bias"] is True
    assert torch_settings["decayed_param_names"] == tf_settings["decayed_param_names"]


def _torch_group(built, index=0):
    return built["step"].optimizer.param_groups[index]


def _torch_bn(built):  # the LAST BN layer: an audit that read one layer (the first) would miss it
    return [m for m in built["model"].modules() if isinstance(m, torch.nn.BatchNorm2d)][-1]


def _torch_dropout(built):
    return next(m for m in built["model"].modules() if isinstance(m, torch.nn.Dropout))


def _tf_layer(built, kind):
    import keras

    from tf_impl.layers import BatchNorm

    cls = {"bn": BatchNorm, "dropout": keras.layers.Dropout}[kind]
    return [layer for layer in built["model"].layers if isinstance(layer, cls)][-1]  # the last one


def _flip_first_non_kernel(optimizer):
    index = next(i for i, n in enumerate(optimizer.variable_names) if not n.endswith(".kernel"))
    return [not f if i == index else f for i, f in enumerate(optimizer.decay_flags)]


# (recipe, side, what is broken after the build, the settings that must be flagged)
BREAKS = [
    ("adamw", "torch", lambda b, mp: mp.setitem(_torch_group(b), "weight_decay", 1e-3), {"weight_decay"}),
    ("adamw", "torch", lambda b, mp: mp.setitem(_torch_group(b, 1), "weight_decay", 5e-4),
     {"decayed_param_count", "decayed_param_digest", "decay_bn_and_bias"}),
    ("adamw", "torch", lambda b, mp: mp.setitem(_torch_group(b), "betas", (0.9, 0.999)), {"adam_beta2"}),
    ("adamw", "torch", lambda b, mp: mp.setitem(_torch_group(b), "eps", 1e-8), {"optimizer_epsilon"}),
    ("adamw", "torch", lambda b, mp: mp.setattr(_torch_bn(b), "eps", 1e-3), {"bn_epsilon"}),
    ("adamw", "torch", lambda b, mp: mp.setattr(_torch_bn(b), "momentum", 0.01), {"bn_momentum"}),
    ("adamw", "torch", lambda b, mp: mp.setattr(_torch_dropout(b), "p", 0.5), {"dropout"}),
    ("adamw", "torch", lambda b, mp: mp.setattr(b["step"].loss, "label_smoothing", 0.0), {"label_smoothing"}),
    ("adamw", "torch", lambda b, mp: mp.setattr(b["backend"]._eval, "batch_size", 5), {"eval_batch_size"}),
    # the augmentation text includes the pad: both rows are read from the same built pipeline
    ("adamw", "torch", lambda b, mp: mp.setattr(b["backend"]._train, "pad", 2), {"crop_padding", "augmentation"}),
    ("adamw", "torch", lambda b, mp: mp.setattr(b["backend"]._train, "horizontal_flip", False), {"augmentation"}),
    ("sgd", "torch", lambda b, mp: mp.setitem(_torch_group(b), "momentum", 0.9), {"momentum"}),
    ("sgd", "torch", lambda b, mp: mp.setitem(_torch_group(b), "nesterov", False), {"nesterov"}),
    ("adamw", "tensorflow", lambda b, mp: mp.setattr(b["step"].inner_optimizer, "beta_2", 0.999), {"adam_beta2"}),
    ("adamw", "tensorflow", lambda b, mp: mp.setattr(b["step"].inner_optimizer, "beta_1", 0.8), {"adam_beta1"}),
    ("adamw", "tensorflow", lambda b, mp: mp.setattr(b["step"].inner_optimizer, "adam_epsilon", 1e-8),
     {"optimizer_epsilon"}),
    ("adamw", "tensorflow", lambda b, mp: mp.setattr(b["step"].inner_optimizer, "decay_coefficient", 1e-2),
     {"weight_decay"}),
    ("adamw", "tensorflow", lambda b, mp: mp.setattr(b["step"].inner_optimizer, "decay_mode", "coupled_l2"),
     {"optimizer", "weight_decay_mode"}),
    ("adamw", "tensorflow", lambda b, mp: mp.setattr(b["step"].inner_optimizer, "decay_flags",
                                                      _flip_first_non_kernel(b["step"].inner_optimizer)),
     {"decayed_param_count", "decayed_param_digest", "decay_bn_and_bias"}),
    ("adamw", "tensorflow", lambda b, mp: mp.setattr(_tf_layer(b, "bn"), "epsilon", 1e-3), {"bn_epsilon"}),
    ("adamw", "tensorflow", lambda b, mp: mp.setattr(_tf_layer(b, "bn"), "momentum", 0.5), {"bn_momentum"}),
    ("adamw", "tensorflow", lambda b, mp: mp.setattr(_tf_layer(b, "dropout"), "rate", 0.5), {"dropout"}),
    ("adamw", "tensorflow", lambda b, mp: mp.setattr(b["step"].loss, "label_smoothing", 0.2), {"label_smoothing"}),
    ("adamw", "tensorflow", lambda b, mp: mp.setattr(b["backend"]._eval, "batch_size", 5), {"eval_batch_size"}),
    ("adamw", "tensorflow", lambda b, mp: mp.setattr(b["backend"]._train, "random_crop", False), {"augmentation"}),
    ("adamw", "tensorflow", lambda b, mp: mp.setattr(b["backend"]._train.io, "mean", tf.constant([0.5] * 3)),
     {"input_normalization"}),
    ("sgd", "tensorflow", lambda b, mp: mp.setattr(b["step"].inner_optimizer, "sgd_momentum", 0.9), {"momentum"}),
    ("sgd", "tensorflow", lambda b, mp: mp.setattr(b["step"].inner_optimizer, "nesterov", False), {"nesterov"}),
]


@pytest.mark.parametrize("recipe_name, side, breaker, expected", BREAKS,
                         ids=[f"{r}-{s}-{'+'.join(sorted(e))}" for r, s, _, e in BREAKS])
def test_a_setting_broken_on_one_side_after_the_build_is_flagged(built_sides, monkeypatch, recipe_name, side,
                                                                 breaker, expected):
    built = built_sides(recipe_name)
    before = _flagged(built)
    _baseline_ok(before, built)
    breaker(built[side], monkeypatch)
    assert _flagged(built) - before == expected


def test_fp16_loss_scaling_is_read_back_identically():
    built = {side: _build(side, Recipe(batch_size=8, eval_batch_size=8, epochs=1), "fp16", "seed_cnn")
             for side in SIDES}
    try:
        values = {side: _settings(b)["loss_scaling"] for side, b in built.items()}
    finally:
        import keras

        keras.mixed_precision.set_global_policy("float32")
    assert values["torch"] == values["tensorflow"] == "dynamic (initial scale 65536, growth interval 2000 steps)"


def test_the_loss_object_the_audit_reads_is_the_one_the_step_calls(built_sides, monkeypatch):
    """Changing the loss object's label smoothing changes the loss the step computes (both sides)."""
    built = built_sides("adamw")
    torch_step = built["torch"]["step"]
    logits, labels = torch.randn(6, 10), torch.arange(6) % 10
    for smoothing in (0.0, 0.3):
        torch_step.loss.label_smoothing = smoothing
        want = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=smoothing)
        assert float(torch_step.loss(logits, labels)) == pytest.approx(float(want), rel=1e-6)
    torch_step.loss.label_smoothing = 0.1
    tf_step = built["tensorflow"]["step"]
    tf_logits, tf_labels = tf.constant(logits.numpy()), tf.constant(labels.numpy())
    for smoothing in (0.0, 0.3):
        tf_step.loss.label_smoothing = smoothing
        want = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=smoothing)
        assert float(tf_step.loss(tf_logits, tf_labels)) == pytest.approx(float(want), rel=1e-5)
    tf_step.loss.label_smoothing = 0.1


def test_the_keras_optimizer_applies_the_attributes_the_audit_reads():
    """A beta changed on the built Keras optimizer changes its update exactly as the reference with that beta."""
    from common.init import initial_weights
    from common.optim_reference import ReferenceOptimizer
    from tf_impl import weights as tf_weights
    from tf_impl.models import create_model
    from tf_impl.optim import TrainStep

    model = create_model("seed_cnn", 10, (8, 8, 3))
    tf_weights.set_weights(model, model.arch_spec, initial_weights(model.arch_spec, "torch_default", 0))
    step = TrainStep(model, model.arch_spec, Recipe(optimizer="adam", weight_decay=0.0, lr=1e-3), mode="eager")
    step.inner_optimizer.beta_1, step.inner_optimizer.beta_2 = 0.5, 0.9  # after the build
    names = model.arch_spec.trainable_names()
    before = {n: w for n, w in tf_weights.get_weights(model, model.arch_spec).items() if n in names}
    rng = np.random.default_rng(0)
    # different gradients each step: with a constant one, bias-corrected Adam does not depend on the betas
    steps = [{n: rng.standard_normal(before[n].shape).astype(np.float32) for n in names} for _ in range(3)]
    reference = ReferenceOptimizer(Recipe(optimizer="adam", weight_decay=0.0, adam_beta1=0.5, adam_beta2=0.9))
    want = before
    for grads in steps:
        step.inner_optimizer.learning_rate = 1e-3
        step.optimizer.apply([tf.constant(grads[n]) for n in step.variable_names], step.variables)
        want = reference.step(want, grads, 1e-3)
    got = tf_weights.get_weights(model, model.arch_spec)
    for name in names:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7, err_msg=name)
