"""torch_impl.backend: setup, device/mode resolution, audit read-back, measurement hooks, one full run."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from common.audit import AUDIT_KEYS, DETAIL_KEYS
from common.backend import Backend as BackendProtocol, TrainStep as TrainStepProtocol
from common.config import Recipe
from common.execution import ExecutionConfig
from common.errors import UserError
from common.init import initial_weights
from common.worker import common_settings
from tests.torch_helpers import cpu_spec, tiny_dataset
from torch_impl import backend as backend_module
from torch_impl.backend import Backend, resolve_device, resolve_mode

COMMON_KEYS = {"init_scheme", "lr_schedule", "batch_size", "data_fingerprint", "sampler_seed", "host_allocator",
               "execution_config"}  # common.worker.common_settings


def test_backend_implements_the_protocol():
    backend = Backend()
    assert isinstance(backend, BackendProtocol) and backend.name == "torch"
    model = backend.build_model("seed_cnn", 10, (32, 32, 3))
    assert isinstance(backend.make_train_step(model, cpu_spec("seed_cnn")), TrainStepProtocol)


@pytest.mark.parametrize("text", ["tpu", "cuda:x", "gpu0", ""])
def test_unknown_device_is_a_user_error(text):
    with pytest.raises(UserError, match="device"):
        resolve_device(text)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("text", ["cuda", "cuda:1", "gpu", "GPU:0"])
def test_cuda_without_a_gpu_names_the_fix(text):
    with pytest.raises(UserError, match="--device cpu or auto"):
        resolve_device(text)


def test_auto_and_cpu_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_mode_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda:0")
    assert resolve_mode("best", cpu) == backend_module.FALLBACK_MODE["cpu"] == "eager"
    assert resolve_mode("auto", cuda) == "compile"  # no search resolved it: the fallback
    assert resolve_mode("eager", cpu) == "eager" and resolve_mode("compile", cuda) == "compile"


def test_setup_applies_the_execution_configuration_and_reads_it_back():
    from common.execution import ExecutionConfig

    backend = Backend()
    try:
        spec = cpu_spec(mode="auto", channels_last=None, execution=ExecutionConfig("eager", channels_last=True))
        effective = backend.setup(spec)
        assert effective["channels_last"] is True and effective["execution_mode"] == "eager"
        assert effective["onednn"] == (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)
        assert backend.setup(cpu_spec(mode="auto", channels_last=None))["channels_last"] is True  # the fallback
    finally:
        backend.setup(cpu_spec())


def test_setup_applies_and_reads_back_settings():
    backend = Backend()
    effective = backend.setup(cpu_spec(threads=1, deterministic=True, allow_tf32=True, seed=3))
    try:
        assert effective["intra_op_threads"] == torch.get_num_threads() == 1
        assert effective["device"] == "cpu" and effective["device_type"] == "cpu"
        assert effective["tf32"] is True and torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        assert effective["deterministic"] is True and torch.are_deterministic_algorithms_enabled()
        assert effective["execution_mode"] == "eager" and effective["channels_last"] is False
        assert isinstance(effective["inter_op_threads"], int)
    finally:
        effective = backend.setup(cpu_spec())  # restore the defaults for the other tests
    assert effective["tf32"] is False and effective["deterministic"] is False and effective["intra_op_threads"] == 2


def test_an_inter_op_thread_count_torch_refuses_is_recorded_not_swallowed(monkeypatch):
    """No silent fallback: setup's note reaches the effective settings (manifest) and the audit."""
    def refuse(threads):
        raise RuntimeError("cannot set number of interop threads after parallel work has started")

    monkeypatch.setattr(torch, "set_num_interop_threads", refuse)
    asked = torch.get_num_interop_threads() + 1
    backend = Backend()
    effective = backend.setup(cpu_spec(execution=ExecutionConfig("eager", inter_op_threads=asked)))
    assert len(effective["fallbacks"]) == 1 and "inter-op threads stay" in effective["fallbacks"][0]
    net = backend.build_model("seed_cnn", 10, (16, 16, 3))
    assert "cannot set number of interop threads" in backend.audit(net, backend.make_train_step(net, cpu_spec()))[
        "fallbacks"]
    monkeypatch.undo()
    current = torch.get_num_interop_threads()
    effective = backend.setup(cpu_spec(execution=ExecutionConfig("eager", inter_op_threads=current)))
    assert effective["fallbacks"] == []  # what it asks for is what torch has: nothing to note


def _audit(recipe: Recipe, model="resnet20", **spec_fields):
    spec = cpu_spec(model, recipe=recipe, **spec_fields)
    backend = Backend()
    backend.setup(spec)
    net = backend.build_model(model, 10, (16, 16, 3), recipe.bn_momentum, recipe.bn_epsilon)
    backend.attach_data(tiny_dataset(n_train=8, n_test=4, shape=(16, 16, 3)), spec)  # the pipelines are audited too
    return backend.audit(net, backend.make_train_step(net, spec))


def test_audit_reports_every_key_with_values_read_back():
    audit = _audit(Recipe(bn_momentum=0.2, bn_epsilon=1e-3, label_smoothing=0.1, weight_decay=1e-3))
    assert set(audit) | COMMON_KEYS == set(AUDIT_KEYS) | set(DETAIL_KEYS)
    assert audit["bn_momentum"] == 0.2 and audit["bn_epsilon"] == 1e-3
    assert audit["bn_running_variance"] == "unbiased" and audit["strided_conv_padding"] == "symmetric"
    assert audit["optimizer"] == "sgd" and audit["momentum"] == 0.9 and audit["nesterov"] is True
    assert audit["weight_decay"] == 1e-3 and audit["weight_decay_mode"] == "coupled_l2"
    assert audit["optimizer_epsilon"] is None and audit["label_smoothing"] == 0.1
    assert audit["loss"] == "softmax_cross_entropy_from_logits" and audit["precision"] == "fp32"
    assert audit["device_type"] == "cpu" and audit["execution_mode"] == "eager"
    assert audit["data_format"] == "NCHW" and audit["loss_scaling"] is None
    for key in ("bn_momentum", "bn_epsilon", "weight_decay", "momentum", "label_smoothing"):
        assert type(audit[key]) is float, key
    json.dumps(audit)  # plain values only


@pytest.mark.parametrize("recipe, expected", [
    (dict(optimizer="adamw", weight_decay_mode="decoupled", adam_epsilon=1e-7),
     dict(optimizer="adamw", weight_decay_mode="decoupled", optimizer_epsilon=1e-7, momentum=None, nesterov=None)),
    (dict(optimizer="adam"), dict(optimizer="adam", weight_decay_mode="coupled_l2", optimizer_epsilon=1e-8)),
    (dict(weight_decay_mode="decoupled", decay_bn_and_bias=False, nesterov=False),
     dict(optimizer="sgd", weight_decay_mode="decoupled", weight_decay=5e-4, nesterov=False)),
])
def test_audit_optimizer_variants(recipe, expected):
    audit = _audit(Recipe(**recipe))
    for key, value in expected.items():
        assert audit[key] == value, key


def test_audit_channels_last_and_model_without_batchnorm():
    audit = _audit(Recipe(), model="seed_cnn", channels_last=True)
    assert audit["data_format"] == "NCHW channels_last"
    assert audit["bn_momentum"] is None and audit["bn_running_variance"] is None


def test_to_numpy_and_memory_hooks_on_cpu():
    backend = Backend()
    assert backend.to_numpy(torch.ones(2, dtype=torch.bfloat16)).dtype == np.float32
    assert backend.to_numpy(torch.ones(2, dtype=torch.uint8)).dtype == np.uint8
    backend.synchronize()
    backend.reset_peak_memory()
    assert backend.peak_device_memory_bytes() is None  # never 0 for "not measured"
    assert backend.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert backend.is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried"))
    assert not backend.is_out_of_memory(ValueError("shape mismatch"))
    versions = backend.versions()
    assert versions["torch"] == torch.__version__ and all(isinstance(v, str) for v in versions.values())


def test_bn_running_statistics_follow_torch_convention_over_k_steps():
    """moving = (1-m)*moving + m*batch, with the UNBIASED batch variance, checked in numpy for 3 steps."""
    recipe = Recipe(bn_momentum=0.3)
    backend = Backend()
    backend.setup(cpu_spec(recipe=recipe))
    net = backend.build_model("resnet20", 10, (8, 8, 3), bn_momentum=0.3)
    backend.set_weights(net, initial_weights(net.arch_spec, "torch_default", 0))
    step = backend.make_train_step(net, cpu_spec(recipe=recipe))
    mean, var = np.zeros(16), np.ones(16)
    rng = np.random.default_rng(0)
    for k in range(3):
        images = rng.normal(size=(6, 8, 8, 3)).astype(np.float32)
        conv = backend.layer_outputs(net, images, training=True)["stem.conv"].astype(np.float64)
        mean = 0.7 * mean + 0.3 * conv.mean(axis=(0, 1, 2))
        var = 0.7 * var + 0.3 * conv.var(axis=(0, 1, 2), ddof=1)
        step(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.zeros(6, dtype=torch.int64), 0.1)
        weights = backend.get_weights(net)
        np.testing.assert_allclose(weights["stem.bn.moving_mean"], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(weights["stem.bn.moving_variance"], var, rtol=1e-5, atol=1e-6)


def test_full_run_through_the_shared_worker(monkeypatch):
    """setup -> build -> initial weights -> data -> steps -> eval -> audit, as common.worker drives it."""
    import common.data
    from common import worker

    dataset = tiny_dataset(n_train=48, n_test=20, shape=(16, 16, 3))
    monkeypatch.setattr(common.data, "load_dataset", lambda *a, **k: dataset)
    spec = cpu_spec("resnet20", warmup_steps=1, recipe=Recipe(epochs=2, batch_size=16, eval_batch_size=8))
    result = worker.execute(Backend(), spec)
    assert result.status == "ok", result.error
    assert [e["images"] for e in result.epochs] == [48, 48]
    assert all(np.isfinite(e["train_loss"]) and 0 <= e["test_accuracy"] <= 1 for e in result.epochs)
    assert set(result.settings) == set(AUDIT_KEYS) | set(DETAIL_KEYS)
    assert result.settings.keys() >= common_settings(spec, dataset).keys()
    assert result.trainable_params == 269_722 and result.device_peak_bytes is None
    assert result.compile_s is not None and len(result.step_times_s) == 6 - 2
