"""tf_impl models against the framework-free spec: counts, names, layout, padding, BN statistics.

The cross-framework forward parity lives in test_parity.py; these tests pin
the Keras side on its own (numpy references where the contract defines the
arithmetic: BatchNorm moving statistics, option-A shortcut, symmetric
strided padding, NHWC flatten order).
"""
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from common.architectures import (MOBILENET_V2_CONFIG, PUBLISHED_PARAM_COUNTS,  # noqa: E402
                                  arch_spec)
from common.init import initial_weights  # noqa: E402
from common.registry import list_models  # noqa: E402
from common.weights import WeightLayoutError  # noqa: E402
from tf_impl import weights as tf_weights  # noqa: E402
from keras_impl.layers import keras_layer_name  # noqa: E402
from tf_impl.layers import BatchNorm, batch_norm, conv2d  # noqa: E402
from tf_impl.models import MODELS, create_model  # noqa: E402
from tf_impl.optim import _BN_IMPLEMENTATION  # noqa: E402

IN_SHAPES = [(32, 32, 3), (28, 28, 1)]


def _images(n, in_shape, seed=0):
    return np.random.default_rng(seed).standard_normal((n, *in_shape)).astype(np.float32)


def _probe(model, names):
    """Outputs of the layers with these canonical names (any layer, not only weight-owning ones), eval mode."""
    return keras.Model(model.input, [model.get_layer(keras_layer_name(n)).output for n in names])


def test_every_registered_model_has_a_keras_builder():
    assert sorted(MODELS.names()) == sorted(list_models())


@pytest.mark.parametrize("in_shape", IN_SHAPES)
@pytest.mark.parametrize("model_name", list_models())
def test_counts_names_shapes_and_exact_round_trip(model_name, in_shape):
    num_classes = 10 if in_shape[2] == 3 else 5
    model = create_model(model_name, num_classes, in_shape)
    spec = arch_spec(model_name, num_classes, in_shape)
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    buffers = sum(int(np.prod(v.shape)) for v in model.non_trainable_weights)
    assert trainable == spec.trainable_param_count()
    assert buffers == spec.buffer_count()
    if in_shape == (32, 32, 3) and model_name in PUBLISHED_PARAM_COUNTS:
        assert trainable == PUBLISHED_PARAM_COUNTS[model_name]
    exported = tf_weights.get_weights(model, spec)
    assert {k: v.shape for k, v in exported.items()} == spec.weight_shapes()
    weights = initial_weights(spec, "he_normal_fan_out", seed=3)
    for name in spec.buffer_names():  # non-trivial statistics so a mix-up would show
        weights[name] = np.random.default_rng(1).uniform(0.5, 2.0, weights[name].shape).astype(np.float32)
    tf_weights.set_weights(model, spec, weights)
    back = tf_weights.get_weights(model, spec)
    assert all(back[k].dtype == np.float32 and np.array_equal(back[k], weights[k]) for k in weights)
    assert model(_images(2, in_shape), training=False).shape == (2, num_classes)


def test_set_weights_rejects_a_wrong_shape_before_copying():
    model = create_model("resnet20")
    spec = model.arch_spec
    weights = initial_weights(spec, "torch_default", seed=0)
    before = tf_weights.get_weights(model, spec)
    weights["head.kernel"] = weights["head.kernel"].T  # (10, 64) instead of (64, 10)
    with pytest.raises(WeightLayoutError, match="head.kernel"):
        tf_weights.set_weights(model, spec, weights)
    del weights["head.kernel"]
    with pytest.raises(WeightLayoutError, match="missing"):
        tf_weights.set_weights(model, spec, weights)
    after = tf_weights.get_weights(model, spec)
    assert all(np.array_equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("model_name", list_models())
def test_layer_outputs_cover_every_weight_owning_layer_in_order(model_name):
    model = create_model(model_name, 10, (32, 32, 3))
    spec = model.arch_spec
    tf_weights.set_weights(model, spec, initial_weights(spec, "torch_default", seed=0))
    images = _images(3, (32, 32, 3))
    for training in (False, True):
        outputs = tf_weights.layer_outputs(model, spec, images, training=training)
        assert list(outputs) == [l.name for l in spec.layers]
        for layer in spec.layers:
            out = outputs[layer.name]
            assert out.dtype == np.float32 and out.shape[0] == 3
            channels = layer.params["kernel"][-1] if layer.kind in ("conv", "dense") else None
            if layer.kind == "dwconv":
                channels = layer.params["kernel"][2]
            if layer.kind == "bn":
                channels = layer.params["gamma"][0]
            assert out.shape[-1] == channels, layer.name
        logits = tf_weights.predict(model, images, training=training)
        np.testing.assert_allclose(outputs["head"], logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_name", ["resnet20", "mobilenet_v2"])
def test_training_mode_predict_uses_batch_stats_changes_nothing_and_has_no_dropout(model_name):
    model = create_model(model_name, 10, (32, 32, 3))
    spec = model.arch_spec
    tf_weights.set_weights(model, spec, initial_weights(spec, "torch_default", seed=0))
    before = tf_weights.get_weights(model, spec)
    images = _images(4, (32, 32, 3)) * 3.0 + 1.0  # far from the (0, 1) moving statistics
    first = tf_weights.predict(model, images, training=True)
    second = tf_weights.predict(model, images, training=True)
    np.testing.assert_array_equal(first, second)  # dropout off: deterministic
    assert not np.allclose(first, tf_weights.predict(model, images, training=False), atol=1e-3)
    after = tf_weights.get_weights(model, spec)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    # the flags are restored: a real training-mode call updates the statistics again
    model(images, training=True)
    assert not np.array_equal(tf_weights.get_weights(model, spec)["stem.bn.moving_mean"],
                              before["stem.bn.moving_mean"])


def _numpy_bn_after_steps(batches, momentum, epsilon, gamma, beta):
    mean, var = np.zeros(gamma.shape), np.ones(gamma.shape)
    outputs = []
    for x in batches:
        x = x.astype(np.float64)
        n = x.shape[0] * x.shape[1] * x.shape[2]
        batch_mean = x.mean(axis=(0, 1, 2))
        biased = x.var(axis=(0, 1, 2))
        outputs.append((x - batch_mean) / np.sqrt(biased + epsilon) * gamma + beta)
        mean = (1 - momentum) * mean + momentum * batch_mean
        var = (1 - momentum) * var + momentum * biased * n / (n - 1)  # unbiased, torch's convention
    return mean, var, outputs


@pytest.fixture(params=["fused", "composed"])
def bn_implementation(request):
    with BatchNorm.using(request.param):
        yield request.param


@pytest.mark.parametrize("compiled", [None, "graph", "xla"])
def test_batchnorm_moving_statistics_follow_torch_after_k_steps(compiled, bn_implementation):
    """K training-mode steps: outputs use the biased batch variance, moving variance the unbiased one."""
    if compiled == "xla" and bn_implementation == "fused":  # never used: the XLA path picks composed ops
        pytest.skip("XLA's lowering of the fused kernel uses a one-pass variance: see the next test")
    momentum, epsilon, steps = 0.3, 1e-5, 4
    layer = batch_norm(momentum, epsilon, "bn")
    rng = np.random.default_rng(0)
    batches = [rng.normal(2.0, 3.0, (3, 5, 4, 6)).astype(np.float32) for _ in range(steps)]
    batches[1][..., 0] = 0.0  # a dead (constant) channel: zero variance, output = beta
    for b in batches:  # variance ~ epsilon: any change to epsilon would show
        b[..., 1] = rng.normal(0.5, 3e-3, b.shape[:3])
    layer.build((None, 5, 4, 6))
    gamma = rng.uniform(0.5, 1.5, 6).astype(np.float32)
    beta = rng.normal(size=6).astype(np.float32)
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    call = lambda x: layer(x, training=True)  # noqa: E731
    if compiled:
        call = tf.function(call, jit_compile=compiled == "xla")
    outputs = [call(tf.constant(b)).numpy() for b in batches]
    mean, var, expected = _numpy_bn_after_steps(batches, momentum, epsilon, gamma, beta)
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), var, rtol=1e-5, atol=1e-6)
    for got, want in zip(outputs, expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # inference: the moving statistics
    x = batches[0]
    want = (x - mean) / np.sqrt(var + epsilon) * gamma + beta
    np.testing.assert_allclose(layer(x, training=False).numpy(), want, rtol=1e-4, atol=1e-4)
    assert isinstance(layer, BatchNorm) and layer.running_variance_estimator == "unbiased"
    assert abs((1 - layer.momentum) - momentum) < 1e-12 and layer.epsilon == epsilon


def test_xla_lowering_of_the_fused_kernel_is_why_xla_uses_composed_ops():
    """A channel with |mean| >> std: XLA's fused BN cancels, the composed two-pass ops do not."""
    x = np.random.default_rng(0).normal(0.5, 3e-3, (3, 5, 4, 1)).astype(np.float32)
    want = (x - x.mean(dtype=np.float64)) / np.sqrt(x.var(dtype=np.float64) + 1e-5)
    errors = {}
    for name in ("fused", "composed"):
        layer = batch_norm(0.1, 1e-5, f"bn_{name}")
        layer.build(x.shape)
        with BatchNorm.using(name):
            out = tf.function(lambda t: layer(t, training=True), jit_compile=True)(tf.constant(x))
        errors[name] = np.abs(out.numpy() - want).max()
    assert errors["composed"] < 1e-4 < errors["fused"]
    assert _BN_IMPLEMENTATION == {"eager": "fused", "graph": "fused", "xla": "composed"}


def test_batchnorm_gradients_match_float64(bn_implementation):
    rng = np.random.default_rng(1)
    x = rng.normal(4.0, 0.05, (8, 3, 3, 5))  # |mean| >> std: where x*s - mean*s would cancel
    upstream = rng.normal(size=x.shape)
    gamma, beta = rng.uniform(0.5, 1.5, 5), rng.normal(size=5)
    layer = batch_norm(0.1, 1e-5, "bn")
    layer.build(x.shape)
    layer.gamma.assign(gamma.astype(np.float32))
    layer.beta.assign(beta.astype(np.float32))
    inputs = tf.constant(x, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        loss = tf.reduce_sum(layer(inputs, training=True) * upstream.astype(np.float32))
    got = [g.numpy() for g in tape.gradient(loss, [inputs, layer.gamma, layer.beta])]
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    xhat = (x - mean) / np.sqrt(var + 1e-5)
    dgamma, dbeta = (upstream * xhat).sum(axis=(0, 1, 2)), upstream.sum(axis=(0, 1, 2))
    dxhat = upstream * gamma
    dx = (dxhat - dxhat.mean(axis=(0, 1, 2)) - xhat * (dxhat * xhat).mean(axis=(0, 1, 2))) / np.sqrt(var + 1e-5)
    for value, want in zip(got, [dx, dgamma, dbeta]):
        np.testing.assert_allclose(value, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())


def test_batchnorm_computes_in_float32_under_mixed_precision():
    layer = BatchNorm(momentum=0.9, epsilon=1e-5, dtype="mixed_bfloat16")
    x = np.random.default_rng(0).normal(1000.0, 1.0, (4, 3, 3, 2)).astype(np.float32)
    out = layer(x, training=True)
    assert out.dtype == tf.bfloat16
    assert layer.moving_mean.dtype == "float32"
    # bf16 input rounding dominates; float32 math keeps the mean right to bf16 precision of 1000
    np.testing.assert_allclose(layer.moving_mean.numpy(), 0.1 * x.mean(axis=(0, 1, 2)), rtol=1e-2)


def test_strided_conv_pads_symmetrically_like_torch():
    inputs = keras.Input((8, 8, 2))
    model = keras.Model(inputs, conv2d(inputs, 3, 3, 2, name="c"))
    kernel = np.random.default_rng(0).standard_normal((3, 3, 2, 3)).astype(np.float32)
    model.get_layer("c").kernel.assign(kernel)
    x = _images(2, (8, 8, 2))
    want = tf.nn.conv2d(x, kernel, strides=2, padding=[[0, 0], [1, 1], [1, 1], [0, 0]]).numpy()
    np.testing.assert_allclose(model(x).numpy(), want, rtol=1e-5, atol=1e-5)
    keras_same = tf.nn.conv2d(x, kernel, strides=2, padding="SAME").numpy()
    assert not np.allclose(want, keras_same)  # the pitfall this padding avoids


def test_resnet20_option_a_shortcut_matches_numpy():
    model = create_model("resnet20", 10, (32, 32, 3))
    spec = model.arch_spec
    weights = initial_weights(spec, "torch_default", seed=0)
    tf_weights.set_weights(model, spec, weights)
    names = ["stage1.block2.relu2", "stage2.block0.bn2", "stage2.block0.relu2"]
    block_in, bn2, block_out = [t.numpy() for t in _probe(model, names)(_images(2, (32, 32, 3)))]
    sub = block_in[:, ::2, ::2, :]  # even rows/cols from 0
    shortcut = np.concatenate([np.zeros(sub.shape[:3] + (8,)), sub, np.zeros(sub.shape[:3] + (8,))], axis=-1)
    np.testing.assert_allclose(block_out, np.maximum(bn2 + shortcut, 0), rtol=1e-5, atol=1e-5)


def test_seed_cnn_fc1_reads_the_nhwc_flatten_order():
    model = create_model("seed_cnn", 10, (28, 28, 1))
    spec = model.arch_spec
    weights = initial_weights(spec, "torch_default", seed=0)
    tf_weights.set_weights(model, spec, weights)
    pooled, fc1 = [t.numpy() for t in _probe(model, ["pool3", "fc1"])(_images(2, (28, 28, 1)))]
    assert pooled.shape[1:] == spec.layer("fc1").after_flatten == (3, 3, 256)
    want = pooled.reshape(2, -1) @ weights["fc1.kernel"] + weights["fc1.bias"]
    np.testing.assert_allclose(fc1, want, rtol=1e-4, atol=1e-4)


def test_mobilenet_residuals_and_vgg_global_pool_follow_the_spec():
    model = create_model("mobilenet_v2", 10, (32, 32, 3))
    with_residual, index, channels = set(), 0, 32
    for _t, c, n, s in MOBILENET_V2_CONFIG:
        for i in range(n):
            if (s if i == 0 else 1) == 1 and channels == c:
                with_residual.add(keras_layer_name(f"block{index}.add"))
            index, channels = index + 1, c
    adds = {l.name for l in model.layers if isinstance(l, keras.layers.Add)}
    assert adds == with_residual
    relu6 = [l for l in model.layers if isinstance(l, keras.layers.ReLU)]
    assert relu6 and all(l.max_value == 6.0 for l in relu6)
    assert isinstance(model.get_layer("dropout"), keras.layers.Dropout)
    assert model.get_layer("dropout").rate == pytest.approx(0.2)
    vgg = create_model("vgg11_bn", 10, (28, 28, 1))
    pools = [l for l in vgg.layers if "pool" in type(l).__name__.lower()]
    assert isinstance(pools[-1], keras.layers.GlobalMaxPooling2D)
    assert all(isinstance(p, keras.layers.MaxPooling2D) for p in pools[:-1])


def test_bn_layers_take_momentum_and_epsilon_from_the_recipe():
    model = create_model("resnet20", 10, (32, 32, 3), bn_momentum=0.01, bn_epsilon=1e-3)
    bns = [l for l in model.layers if isinstance(l, BatchNorm)]
    assert len(bns) == 19
    assert all(abs(l.momentum - 0.99) < 1e-12 and l.epsilon == 1e-3 for l in bns)
