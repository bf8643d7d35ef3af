"""torch_impl models, layers and canonical weight I/O, checked against common.architectures and numpy."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from common.architectures import MOBILENET_V2_CONFIG, PUBLISHED_PARAM_COUNTS, arch_spec
from common.init import initial_weights
from common.registry import list_models
from common.weights import WeightLayoutError
from torch_impl.backend import Backend
from torch_impl.layers import OptionAShortcut, conv2d
from torch_impl.models import MODELS, create_model

SHAPES = [(32, 32, 3), (28, 28, 1)]


@pytest.fixture(scope="module")
def backend():
    return Backend()  # CPU, fp32, NCHW defaults (no setup needed to build models)


def _numpy_conv(x, kernel, stride=1, pad=1):
    """NHWC x HWIO conv with symmetric zero padding (float64)."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw = kernel.shape[:2]
    h = (x.shape[1] - kh) // stride + 1
    w = (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], h, w, kernel.shape[3]))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i:i + stride * h:stride, j:j + stride * w:stride, :]
            out += np.einsum("nhwc,co->nhwo", patch, kernel[i, j])
    return out


def test_every_model_is_registered():
    assert sorted(MODELS.names()) == sorted(list_models())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("model", list_models())
def test_counts_names_and_exact_round_trip(backend, model, shape):
    net = backend.build_model(model, 7, shape)
    spec = arch_spec(model, 7, shape)
    assert backend.trainable_param_count(net) == spec.trainable_param_count()
    assert backend.buffer_count(net) == spec.buffer_count()
    weights = initial_weights(spec, "he_normal_fan_out", seed=3)
    backend.set_weights(net, weights)
    back = backend.get_weights(net)
    assert {k: v.shape for k, v in back.items()} == spec.weight_shapes()
    for name, value in weights.items():
        assert back[name].dtype == np.float32
        assert np.array_equal(back[name], value), name  # bit-exact
    logits = backend.predict(net, np.random.default_rng(0).normal(size=(2, *shape)).astype(np.float32))
    assert logits.shape == (2, 7) and np.isfinite(logits).all()


@pytest.mark.parametrize("model", sorted(PUBLISHED_PARAM_COUNTS))
def test_published_param_counts(backend, model):
    assert backend.trainable_param_count(backend.build_model(model, 10, (32, 32, 3))) == PUBLISHED_PARAM_COUNTS[model]


def test_channels_last_model_round_trips_and_predicts_the_same():
    spec = arch_spec("resnet20")
    weights = initial_weights(spec, "torch_default", seed=0)
    images = np.random.default_rng(1).normal(size=(3, 32, 32, 3)).astype(np.float32)
    outputs = []
    for channels_last in (False, True):
        backend = Backend()
        backend.channels_last = channels_last
        net = backend.build_model("resnet20", 10, (32, 32, 3))
        assert net.stem.conv.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
        backend.set_weights(net, weights)
        assert all(np.array_equal(v, weights[k]) for k, v in backend.get_weights(net).items())
        outputs.append(backend.predict(net, images))
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


def test_set_weights_rejects_wrong_names_and_shapes(backend):
    net = backend.build_model("resnet20", 10, (32, 32, 3))
    weights = initial_weights(net.arch_spec, "torch_default", seed=0)
    bad = dict(weights)
    bad["stem.conv.kernel"] = bad["stem.conv.kernel"].transpose(1, 0, 3, 2)  # (3,3,16,3): wrong
    with pytest.raises(WeightLayoutError):
        backend.set_weights(net, bad)
    missing = dict(weights)
    del missing["head.bias"]
    with pytest.raises(WeightLayoutError):
        backend.set_weights(net, missing)


def test_seed_cnn_forward_equals_numpy_reference(backend):
    """Checks HWIO -> OIHW, the NHWC flatten permutation of fc1, pooling and ReLU placement."""
    shape = (16, 16, 3)  # fc1 input is 2x2x256: the flatten order matters
    net = backend.build_model("seed_cnn", 5, shape)
    weights = initial_weights(net.arch_spec, "torch_default", seed=2)
    backend.set_weights(net, weights)
    x = np.random.default_rng(0).normal(size=(2, *shape)).astype(np.float32)
    h = x.astype(np.float64)
    for i in (1, 2, 3):
        h = np.maximum(_numpy_conv(h, weights[f"conv{i}.kernel"]) + weights[f"conv{i}.bias"], 0)
        n, hh, ww, c = h.shape
        h = h[:, :hh // 2 * 2, :ww // 2 * 2].reshape(n, hh // 2, 2, ww // 2, 2, c).max(axis=(2, 4))
    h = h.reshape(len(h), -1)  # NHWC flatten: the canonical fc1 row order
    for name in ("fc1", "fc2"):
        h = np.maximum(h @ weights[f"{name}.kernel"] + weights[f"{name}.bias"], 0)
    expected = h @ weights["head.kernel"] + weights["head.bias"]
    np.testing.assert_allclose(backend.predict(net, x), expected, rtol=1e-4, atol=1e-4)


def test_strided_conv_pads_symmetrically():
    torch.manual_seed(0)
    conv = conv2d(3, 4, 3, stride=2)
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    kernel = conv.weight.detach().numpy().transpose(2, 3, 1, 0)  # OIHW -> HWIO
    with torch.no_grad():
        out = conv(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(out, _numpy_conv(x, kernel, stride=2, pad=1), rtol=1e-5, atol=1e-5)


def test_option_a_shortcut_subsamples_even_pixels_and_centres_zero_channels():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    out = OptionAShortcut(3, 8, stride=2)(x).numpy()
    assert out.shape == (2, 8, 3, 3)
    expected = np.zeros((2, 8, 3, 3), np.float32)
    expected[:, 2:5] = x.numpy()[:, :, ::2, ::2]  # (8-3)//2 = 2 zero channels before, 3 after
    np.testing.assert_array_equal(out, expected)


def test_block_structure_follows_the_spec():
    resnet18 = create_model("resnet18")
    assert isinstance(resnet18.stage1.block0.shortcut, torch.nn.Identity)
    assert resnet18.stage2.block0.shortcut.conv.stride == (2, 2)
    assert create_model("resnet20").stage2.block0.conv1.padding == (1, 1)
    net = create_model("mobilenet_v2")
    in_channels, index = 32, 0
    for t, c, n, s in MOBILENET_V2_CONFIG:
        for i in range(n):
            block = getattr(net, f"block{index}")
            assert (block.expand is None) == (t == 1)
            assert block.use_residual == ((s if i == 0 else 1) == 1 and in_channels == c)
            assert isinstance(block.depthwise.act, torch.nn.ReLU6) and isinstance(block.project.act, torch.nn.Identity)
            in_channels, index = c, index + 1
    vgg = create_model("vgg11_bn", 10, (28, 28, 1))
    assert vgg.block1.conv.bias is not None and vgg.plan[-1] == "M"


@pytest.mark.parametrize("model", ["resnet20", "mobilenet_v2", "vgg11_bn"])
def test_training_mode_predict_uses_batch_stats_without_side_effects(backend, model):
    net = backend.build_model(model, 10, (32, 32, 3))
    backend.set_weights(net, initial_weights(net.arch_spec, "torch_default", seed=0))
    before = {k: v.copy() for k, v in backend.get_weights(net).items()}
    x = np.random.default_rng(0).normal(1.0, 2.0, size=(4, 32, 32, 3)).astype(np.float32)
    first = backend.predict(net, x, training=True)
    second = backend.predict(net, x, training=True)  # dropout (mobilenet_v2) must be off: identical
    np.testing.assert_array_equal(first, second)
    assert not np.allclose(first, backend.predict(net, x))  # batch statistics differ from moving ones
    after = backend.get_weights(net)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert int(net.get_submodule(net.arch_spec.layers[1].name).num_batches_tracked) == 0


@pytest.mark.parametrize("training", [False, True])
def test_layer_outputs_names_shapes_and_semantics(backend, training):
    net = backend.build_model("resnet20", 10, (32, 32, 3))
    weights = initial_weights(net.arch_spec, "torch_default", seed=0)
    weights["stem.bn.moving_mean"] = np.linspace(-1, 1, 16).astype(np.float32)
    weights["stem.bn.moving_variance"] = np.linspace(0.5, 2, 16).astype(np.float32)
    weights["stem.bn.gamma"] = np.linspace(0.5, 1.5, 16).astype(np.float32)
    backend.set_weights(net, weights)
    x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    outputs = backend.layer_outputs(net, x, training=training)
    assert list(outputs) == [layer.name for layer in net.arch_spec.layers]
    assert outputs["stem.conv"].shape == (4, 32, 32, 16)  # NHWC
    assert outputs["stage3.block0.conv1"].shape == (4, 8, 8, 64)
    assert outputs["head"].shape == (4, 10)
    np.testing.assert_allclose(outputs["head"], backend.predict(net, x, training=training), rtol=1e-5, atol=1e-5)
    conv = outputs["stem.conv"].astype(np.float64)  # the conv output BEFORE its BN (and before ReLU)
    np.testing.assert_allclose(conv, _numpy_conv(x, weights["stem.conv.kernel"]), rtol=1e-4, atol=1e-4)
    if training:  # normalised with the biased batch variance
        mean, var = conv.mean(axis=(0, 1, 2)), conv.var(axis=(0, 1, 2))
    else:
        mean, var = weights["stem.bn.moving_mean"], weights["stem.bn.moving_variance"]
    expected = (conv - mean) / np.sqrt(var + 1e-5) * weights["stem.bn.gamma"] + weights["stem.bn.beta"]
    np.testing.assert_allclose(outputs["stem.bn"], expected, rtol=1e-4, atol=1e-4)
    assert outputs["stem.bn"].min() < 0  # captured before the in-place ReLU


def test_bn_hyperparameters_reach_every_layer():
    net = Backend().build_model("mobilenet_v2", 10, (32, 32, 3), bn_momentum=0.01, bn_epsilon=1e-3)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == len([l for l in net.arch_spec.layers if l.kind == "bn"])
    assert all(m.momentum == 0.01 and m.eps == 1e-3 for m in norms)
