"""The parity ladder for every registered model: counts -> round trip -> forward -> per layer.

Both backends run in this process (conftest imports torch and triton before
tensorflow can be imported). Inputs are unfriendly (N(0, 1) images, every BN
parameter and statistic random: compare.parity.unfriendly_weights) and the
criterion is relative to the logit scale (compare.parity.DEFAULT_RTOL), which
holds on AVX2-only and AVX-512 CPUs alike while the broken variants below miss
it by orders of magnitude.
"""
import numpy as np
import pytest

from common.architectures import PUBLISHED_PARAM_COUNTS, arch_spec
from common.config import RunSpec
from common.init import initial_weights
from common.parity import backend_outputs
from common.registry import get_backend, list_models
from compare.parity import DEFAULT_RTOL, compare_model, parity_images, run_parity, unfriendly_weights

IN_SHAPES = [(32, 32, 3), (28, 28, 1)]


@pytest.fixture(scope="module")
def backends():
    out = {}
    for name in ("torch", "tensorflow"):
        backend = get_backend(name)
        backend.setup(RunSpec(model="resnet20", backend=name, device="cpu", threads=2, mode="eager"
                              if name == "torch" else "graph"))
        out[name] = backend
    return out


def _ladder(backends, model, in_shape, num_classes=10, scheme="torch_default", layers=True, tf_bn_epsilon=1e-5):
    spec = arch_spec(model, num_classes, in_shape)
    weights = unfriendly_weights(spec, initial_weights(spec, scheme, seed=1), seed=1)
    images = parity_images(in_shape, 8, seed=1)
    own = {"torch": backend_outputs(backends["torch"], model, weights, images, num_classes, in_shape, layers=layers),
           "tensorflow": backend_outputs(backends["tensorflow"], model, weights, images, num_classes, in_shape,
                                         layers=layers, bn_epsilon=tf_bn_epsilon)}
    crossed = {"torch": backend_outputs(backends["torch"], model, own["tensorflow"]["weights"], images,
                                        num_classes, in_shape, layers=False),
               "tensorflow": backend_outputs(backends["tensorflow"], model, own["torch"]["weights"], images,
                                             num_classes, in_shape, layers=False, bn_epsilon=tf_bn_epsilon)}
    return compare_model(model, weights, own, {"tensorflow": crossed["tensorflow"]}, {"tensorflow": crossed["torch"]},
                         num_classes, in_shape)


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
        for direction in ("same_weights_tf", "torch_into_tf", "tf_into_torch"):
            rel = report[f"{mode}_{direction}_max_rel_diff"]
            assert rel <= DEFAULT_RTOL, f"{mode} {direction}: max |logit diff| / max |logit| = {rel:.2e}"
        assert report[f"first_divergent_layer_{mode}"] is None, report[f"layers_{mode}"]
        assert [r["layer"] for r in report[f"layers_{mode}"]] == [l.name for l in spec.layers]
    for direction in ("same_weights_tf", "torch_into_tf", "tf_into_torch"):
        rel = report[f"embedding_{direction}_max_rel_diff"]
        assert rel <= DEFAULT_RTOL, f"embeddings {direction}: max |diff| / max |value| = {rel:.2e}"
    assert report["passed"]


@pytest.mark.parametrize("model", list_models())
def test_parity_small_grayscale_input(backends, model):
    report = _ladder(backends, model, (28, 28, 1), num_classes=5, scheme="he_normal_fan_out", layers=False)
    assert report["counts_match"] and report["round_trip_exact"]
    assert report["max_rel_diff"] <= DEFAULT_RTOL, report["max_rel_diff"]
    assert report["embedding_same_weights_tf_max_rel_diff"] <= DEFAULT_RTOL


def test_unfriendly_weights_randomise_every_bn_value_and_nothing_else():
    spec = arch_spec("resnet20")
    weights = initial_weights(spec, "torch_default", seed=0)
    changed = unfriendly_weights(spec, weights, seed=0)
    for name, value in weights.items():
        is_bn = name.rsplit(".", 1)[1] in ("gamma", "beta", "moving_mean", "moving_variance")
        assert np.array_equal(changed[name], value) != is_bn, name
    variances = np.concatenate([changed[n] for n in spec.buffer_names() if n.endswith("moving_variance")])
    assert variances.min() >= 0.5 and variances.max() <= 2.0 and variances.std() > 0.3


@pytest.mark.parametrize("model", ["resnet20", "mobilenet_v2"])
def test_keras_default_bn_epsilon_fails_parity_at_the_first_bn(backends, model):
    """Keras's default BN epsilon (1e-3 instead of 1e-5), with ordinary random statistics, misses the
    relative criterion in eval mode (>3x) and in training mode (>10x), and is blamed on the first BN layer."""
    report = _ladder(backends, model, (32, 32, 3), tf_bn_epsilon=1e-3)
    assert not report["passed"]
    assert report["eval_same_weights_tf_max_rel_diff"] > 3 * DEFAULT_RTOL, report["eval_same_weights_tf_max_rel_diff"]
    assert report["train_same_weights_tf_max_rel_diff"] > 10 * DEFAULT_RTOL, report["train_same_weights_tf_max_rel_diff"]
    assert report["first_divergent_layer_train"] == "stem.bn"


@pytest.mark.slow
def test_parity_ladder_keras_torch_every_model_in_worker_processes():
    """keras-torch (Keras on PyTorch: one process per phase, as `dualbench parity` runs it) against torch:
    counts, exact weight round trip both ways, logits in eval and training mode in both directions at the
    same relative criterion as tensorflow, no divergent layer (`dualbench parity` adds tensorflow against
    keras-torch on the same weights), and the embeddings (what retrieval ranks) likewise. The broken variant of this code (Keras's BN epsilon) is
    test_keras_default_bn_epsilon_fails_parity_at_the_first_bn: the same keras_impl layers."""
    reports = run_parity(list_models(), backends=("torch", "keras-torch"), threads=2)
    for report in reports:
        spec = arch_spec(report["model"])
        assert report["kt_trainable_params"] == spec.trainable_param_count() and report["kt_buffers"] == spec.buffer_count()
        assert report["round_trip_exact"] and report["forward_unchanged_weights"], report["model"]
        for mode in ("eval", "train"):
            for direction in ("same_weights_kt", "torch_into_kt", "kt_into_torch"):
                rel = report[f"{mode}_{direction}_max_rel_diff"]
                assert rel <= DEFAULT_RTOL, f"{report['model']} {mode} {direction}: {rel:.2e}"
            assert report[f"first_divergent_layer_{mode}"] is None, report["model"]
        for direction in ("same_weights_kt", "torch_into_kt", "kt_into_torch"):
            rel = report[f"embedding_{direction}_max_rel_diff"]
            assert rel <= DEFAULT_RTOL, f"{report['model']} embeddings {direction}: {rel:.2e}"
        assert report["passed"], report["model"]


@pytest.mark.parametrize("model", list_models())
def test_embedding_is_the_classifier_input(backends, model):
    """embed() returns the penultimate features: the head applied to them gives the logits, on both sides."""
    from common.architectures import EMBEDDING_LAYER

    spec = arch_spec(model, 10, (28, 28, 1))
    weights = initial_weights(spec, "torch_default", seed=2)
    images = parity_images((28, 28, 1), 4, seed=2)
    for backend in backends.values():
        net = backend.build_model(model, 10, (28, 28, 1))
        backend.set_weights(net, weights)
        features = backend.embed(net, images)
        assert features.shape == (4, spec.embedding_dim()) and features.dtype == np.float32
        head = features @ weights[f"{EMBEDDING_LAYER}.kernel"] + weights[f"{EMBEDDING_LAYER}.bias"]
        logits = backend.predict(net, images)
        assert np.abs(head - logits).max() <= 1e-4 * np.abs(logits).max()
