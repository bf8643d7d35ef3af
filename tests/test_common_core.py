"""The framework-free core: import hygiene, config validation, specs, init, layouts."""
import subprocess
import sys

import numpy as np
import pytest

from common.architectures import ARCHITECTURES, PUBLISHED_PARAM_COUNTS, arch_spec
from common.config import Recipe, RunSpec
from common.errors import ConfigError
from common.init import SCHEMES, initial_weights
from common.registry import ModelRegistry, list_models, parse_models
from common.weights import WeightLayoutError, check_weights, from_torch, to_torch

FRAMEWORKS = ("torch", "tensorflow", "keras", "torchvision", "tensorflow_datasets", "jax")


def test_import_common_pulls_in_no_framework():
    code = ("import sys, pkgutil, importlib, common\n"
            "for m in pkgutil.walk_packages(common.__path__, 'common.'):\n"
            "    importlib.import_module(m.name)\n"
            f"bad = [m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r}]\n"
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("model,count", sorted(PUBLISHED_PARAM_COUNTS.items()))
def test_published_parameter_counts(model, count):
    assert arch_spec(model).trainable_param_count() == count


@pytest.mark.parametrize("model", list(ARCHITECTURES))
@pytest.mark.parametrize("in_shape", [(32, 32, 3), (28, 28, 1)])
def test_every_model_has_a_spec_for_both_input_shapes(model, in_shape):
    spec = arch_spec(model, 7, in_shape)
    shapes = spec.weight_shapes()
    assert shapes["head.kernel"][1] == 7
    first = spec.layers[0].params["kernel"]
    assert first[2] == in_shape[2]
    assert spec.macs() > 0 and spec.trainable_param_count() > 0


def test_bn_buffers_are_counted_apart():
    spec = arch_spec("resnet20")
    # 19 BN layers x (16..64 channels) x 2 statistics
    assert spec.buffer_count() == 1376
    assert all(n.endswith(("moving_mean", "moving_variance")) for n in spec.buffer_names())


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown model 'resnet21'.*resnet20"):
        arch_spec("resnet21")
    with pytest.raises(ConfigError, match="unknown model"):
        parse_models("seed_cnn,nope")
    assert parse_models("all") == list_models()
    assert parse_models("resnet*") == ["resnet20", "resnet18"]


@pytest.mark.parametrize("kwargs,match", [
    ({"epochs": 0}, "epochs"), ({"batch_size": -1}, "batch_size"), ({"optimizer": "lion"}, "optimizer"),
    ({"momentum": 1.0}, "momentum"), ({"label_smoothing": 1.0}, "label_smoothing"),
    ({"weight_decay_mode": "l1"}, "weight_decay_mode"), ({"warmup_epochs": 20, "epochs": 2}, "warmup"),
])
def test_recipe_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Recipe(**kwargs)


def test_runspec_validation_and_round_trip():
    with pytest.raises(ConfigError, match="mode for torch"):
        RunSpec("resnet20", "torch", mode="xla")
    with pytest.raises(ConfigError, match="precision"):
        RunSpec("resnet20", "tensorflow", precision="fp8")
    spec = RunSpec("resnet20", "tensorflow", mode="xla", recipe=Recipe(step_milestones=(0.3,)))
    assert RunSpec.from_dict(spec.to_dict()) == spec
    assert spec.run_id() == "resnet20__tensorflow__seed0"


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_initial_weights_are_deterministic_and_match_the_spec(scheme):
    spec = arch_spec("mobilenet_v2")
    a = initial_weights(spec, scheme, seed=3)
    b = initial_weights(spec, scheme, seed=3)
    c = initial_weights(spec, scheme, seed=4)
    check_weights(spec, a)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["head.kernel"], c["head.kernel"])
    assert all(v.dtype == np.float32 for v in a.values())


def test_init_statistics_follow_their_definitions():
    spec = arch_spec("resnet18")
    layer = spec.layer("stage4.block1.conv2")  # 3x3x512x512
    fan_in = fan_out = 3 * 3 * 512
    w = initial_weights(spec, "torch_default", 0)["stage4.block1.conv2.kernel"]
    assert abs(w.max() - 1 / np.sqrt(fan_in)) < 1e-4 and abs(w.min() + 1 / np.sqrt(fan_in)) < 1e-4
    w = initial_weights(spec, "he_normal_fan_out", 0)["stage4.block1.conv2.kernel"]
    assert abs(w.std() - np.sqrt(2 / fan_out)) / np.sqrt(2 / fan_out) < 0.01
    w = initial_weights(spec, "glorot_uniform", 0)["stage4.block1.conv2.kernel"]
    assert abs(w.max() - np.sqrt(6 / (fan_in + fan_out))) < 1e-4
    assert layer.kind == "conv"


def test_dense_after_flatten_permutation_matches_nchw_flatten():
    """A dense kernel in NHWC-flatten order, permuted for torch, gives the same outputs on NCHW-flattened input."""
    spec = arch_spec("seed_cnn")
    layer = spec.layer("fc1")
    h, w, c = layer.after_flatten
    rng = np.random.default_rng(0)
    x_nhwc = rng.standard_normal((2, h, w, c)).astype(np.float32)
    kernel = rng.standard_normal(layer.params["kernel"]).astype(np.float32)
    keras_out = x_nhwc.reshape(2, -1) @ kernel
    torch_kernel = to_torch(layer, "kernel", kernel)  # (out, in) for NCHW-flattened input
    torch_out = x_nhwc.transpose(0, 3, 1, 2).reshape(2, -1) @ torch_kernel.T
    np.testing.assert_allclose(torch_out, keras_out, rtol=1e-5, atol=1e-4)
    assert np.array_equal(from_torch(layer, "kernel", torch_kernel), kernel)


def test_check_weights_names_the_problem():
    spec = arch_spec("resnet20")
    weights = initial_weights(spec, "torch_default", 0)
    weights["head.kernel"] = weights["head.kernel"].T
    with pytest.raises(WeightLayoutError, match="head.kernel has shape"):
        check_weights(spec, weights)
    del weights["head.kernel"]
    with pytest.raises(WeightLayoutError, match="missing"):
        check_weights(spec, weights)


def test_model_registry_rejects_models_without_a_spec():
    registry = ModelRegistry("x")
    with pytest.raises(ValueError):
        registry.register("resnet99")
    registry.register("resnet20")(lambda **kw: "built")
    assert registry.create("resnet20") == "built"
    with pytest.raises(ConfigError):
        registry.create("seed_cnn")


def test_from_torch_never_returns_a_view_of_its_input():
    spec = arch_spec("resnet20")
    for layer in (spec.layer("stem.bn"), spec.layer("head")):
        for param, shape in layer.params.items():
            live = np.zeros(to_torch(layer, param, np.zeros(shape, np.float32)).shape, np.float32)
            out = from_torch(layer, param, live)
            live += 1.0
            assert not out.any(), f"{layer.name}.{param} aliases the framework tensor"
