"""The parity ladder for every registered model: counts -> round trip -> forward -> per layer.

Both backends run in this process (conftest imports torch and triton before
tensorflow can be imported). The same checks run in subprocesses through
`dualbench parity` (tests/test_parity_cli.py).
"""
import numpy as np
import pytest

from common.architectures import PUBLISHED_PARAM_COUNTS, arch_spec
from common.config import RunSpec
from common.init import initial_weights
from common.parity import backend_outputs
from common.registry import get_backend, list_models
from compare.parity import DEFAULT_ATOL, compare_model, parity_images

IN_SHAPES = [(32, 32, 3), (28, 28, 1)]


@pytest.fixture(scope="module")
def backends():
    out = {}
    for name in ("torch", "tensorflow"):
        backend = get_backend(name)
        backend.setup(RunSpec(model="resnet20", backend=name, device="cpu", threads=2))
        out[name] = backend
    return out


def _ladder(backends, model, in_shape, num_classes=10, scheme="torch_default", layers=True):
    spec = arch_spec(model, num_classes, in_shape)
    weights = initial_weights(spec, scheme, seed=1)
    images = parity_images(in_shape, 4, seed=1)
    own = {n: backend_outputs(b, model, weights, images, num_classes, in_shape, layers=layers)
           for n, b in backends.items()}
    crossed = {"torch": backend_outputs(backends["torch"], model, own["tensorflow"]["weights"], images,
                                        num_classes, in_shape, layers=False),
               "tensorflow": backend_outputs(backends["tensorflow"], model, own["torch"]["weights"], images,
                                             num_classes, in_shape, layers=False)}
    return compare_model(model, weights, own["torch"], own["tensorflow"], crossed["torch"],
                         crossed["tensorflow"], num_classes, in_shape)


@pytest.mark.parametrize("model", list_models())
def test_parity_ladder_cifar_shape(backends, model):
    report = _ladder(backends, model, (32, 32, 3))
    spec = arch_spec(model)
    assert report["torch_trainable_params"] == report["tf_trainable_params"] == spec.trainable_param_count()
    assert report["torch_buffers"] == report["tf_buffers"] == spec.buffer_count()
    if model in PUBLISHED_PARAM_COUNTS:
        assert report["torch_trainable_params"] == PUBLISHED_PARAM_COUNTS[model]
    assert report["round_trip_exact"], "torch -> canonical -> keras -> canonical -> torch is not bit-exact"
    assert report["forward_unchanged_weights"]
    for mode in ("eval", "train"):
        for direction in ("same_weights", "torch_into_tf", "tf_into_torch"):
            diff = report[f"{mode}_{direction}_max_abs_diff"]
            assert diff <= DEFAULT_ATOL, f"{mode} {direction}: max abs logit diff {diff:.2e}"
        assert report[f"first_divergent_layer_{mode}"] is None, report[f"layers_{mode}"]
        assert [r["layer"] for r in report[f"layers_{mode}"]] == [l.name for l in spec.layers]
    assert report["passed"]


@pytest.mark.parametrize("model", list_models())
def test_parity_small_grayscale_input(backends, model):
    report = _ladder(backends, model, (28, 28, 1), num_classes=5, scheme="he_normal_fan_out", layers=False)
    assert report["counts_match"] and report["round_trip_exact"]
    assert report["max_abs_diff"] <= DEFAULT_ATOL


def test_keras_bn_defaults_are_caught_at_the_first_bn(backends):
    """A Keras-default BN epsilon (1e-3 instead of 1e-5) must fail parity, blamed on stem.bn."""
    model, in_shape = "resnet20", (32, 32, 3)
    spec = arch_spec(model)
    weights = initial_weights(spec, "torch_default", seed=2)
    # make the BN statistics non-trivial so epsilon matters
    rng = np.random.default_rng(0)
    for name in spec.buffer_names():
        if name.endswith("moving_variance"):
            weights[name] = rng.uniform(1e-3, 2e-3, weights[name].shape).astype(np.float32)
    images = parity_images(in_shape, 4, seed=2)
    torch_out = backend_outputs(backends["torch"], model, weights, images, 10, in_shape)
    tf_out = backend_outputs(backends["tensorflow"], model, weights, images, 10, in_shape, bn_epsilon=1e-3)
    report = compare_model(model, weights, torch_out, tf_out, torch_out, tf_out, 10, in_shape)
    assert not report["passed"]
    assert report["first_divergent_layer_eval"] == "stem.bn"
