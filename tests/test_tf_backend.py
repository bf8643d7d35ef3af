"""tf_impl.backend: setup, audit read-back, measurement hooks, the shared loop, resume and the worker."""
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from common.audit import AUDIT_KEYS, DETAIL_KEYS  # noqa: E402
from common.backend import Backend as BackendProtocol  # noqa: E402
from common.backend import TrainStep as TrainStepProtocol  # noqa: E402
from common.config import Recipe, RunSpec  # noqa: E402
from common.errors import UserError  # noqa: E402
from common.init import initial_weights  # noqa: E402
from common.loop import train  # noqa: E402
from common.registry import get_backend, list_models  # noqa: E402
from keras_impl.audit import strided_padding  # noqa: E402
from tf_impl.backend import Backend  # noqa: E402

# In-process, an earlier test has usually started the TF runtime: setup() then warns that the thread
# pools cannot change (and the audit reports what TF has). The worker test checks a fresh process.
pytestmark = pytest.mark.filterwarnings("ignore:TensorFlow already initialised:RuntimeWarning")
ROOT = Path(__file__).resolve().parent.parent
COMMON_KEYS = {"init_scheme", "lr_schedule", "batch_size", "data_fingerprint", "sampler_seed", "host_allocator",
               "execution_config"}  # common.worker.common_settings
HAS_GPU = bool(tf.config.list_physical_devices("GPU"))


class TinyDataset:
    """The attributes of common.data.Dataset the backend uses (duck typing)."""

    def __init__(self, n_train=48, n_test=20, shape=(16, 16, 3), seed=0):
        rng = np.random.default_rng(seed)
        self.train_labels = (np.arange(n_train) % 10).astype(np.int64)
        self.test_labels = (np.arange(n_test) % 10).astype(np.int64)
        # learnable: the class sets the mean brightness of one channel
        self.train_images = self._images(rng, self.train_labels, shape)
        self.test_images = self._images(rng, self.test_labels, shape)
        self.class_names = tuple(f"c{i}" for i in range(10))
        self.fingerprint = "tiny"
        self.num_classes = 10
        self.in_shape = shape

    @staticmethod
    def _images(rng, labels, shape):
        base = rng.integers(0, 60, (len(labels), *shape))
        base[..., 0] += labels[:, None, None] * 19
        return base.astype(np.uint8)


def _spec(model="resnet20", **overrides):
    recipe = Recipe(epochs=2, batch_size=16, eval_batch_size=8, lr=0.02, schedule="cosine")
    return replace(RunSpec(model=model, backend="tensorflow", device="cpu", threads=2, warmup_steps=0,
                           recipe=recipe), **overrides)


@pytest.fixture
def backend():
    backend = get_backend("tensorflow")
    yield backend
    keras.mixed_precision.set_global_policy("float32")  # setup() sets a process-wide policy


def _built(backend, spec, data):
    backend.setup(spec)
    model = backend.build_model(spec.model, data.num_classes, data.in_shape,
                                bn_momentum=spec.recipe.bn_momentum, bn_epsilon=spec.recipe.bn_epsilon)
    backend.set_weights(model, initial_weights(model.arch_spec, spec.recipe.init_scheme, spec.seed))
    backend.attach_data(data, spec)
    return model, backend.make_train_step(model, spec), backend.make_eval_step(model)


def test_backend_implements_the_protocol(backend):
    assert isinstance(backend, Backend) and isinstance(backend, BackendProtocol)
    assert backend.name == "tensorflow"


def test_setup_sets_and_reads_back_the_environment(backend):
    settings = backend.setup(_spec())
    assert settings["device"] == "cpu" and settings["device_type"] == "cpu"
    assert settings["execution_mode"] == "graph"  # the fallback on the CPU (no search resolved "auto")
    assert isinstance(settings["onednn"], bool)  # IsMklEnabled(), read back (test_tune: the switch reaches it)
    assert settings["precision"] == "fp32" and settings["data_format"] == "NHWC"
    assert settings["tf32"] is False and tf.config.experimental.tensor_float_32_execution_enabled() is False
    assert settings["deterministic"] is False
    # read back (the values themselves are checked in a fresh process: test_worker_subprocess...;
    # here an earlier test may have started the TF runtime, after which they cannot change)
    assert settings["intra_op_threads"] == tf.config.threading.get_intra_op_parallelism_threads()
    assert settings["inter_op_threads"] == tf.config.threading.get_inter_op_parallelism_threads()
    assert backend.setup(_spec(mode="xla"))["execution_mode"] == "xla"
    assert backend.setup(_spec(mode="eager"))["execution_mode"] == "eager"
    settings = backend.setup(_spec(precision="bf16", deterministic=True))
    assert settings["precision"] == "bf16" and settings["dtype_policy"] == "mixed_bfloat16"
    assert settings["deterministic"] is True
    assert backend.setup(_spec())["deterministic"] is False


@pytest.mark.skipif(HAS_GPU, reason="needs a machine without a GPU")
def test_unusable_devices_raise_a_user_error_naming_the_fix(backend):
    for device in ("cuda", "gpu:1", "cuda:0"):
        with pytest.raises(UserError, match="--device cpu or auto"):
            backend.setup(_spec(device=device))
    with pytest.raises(UserError, match="unknown device .tpu.: use auto"):  # RunSpec refuses it first
        backend.setup(_spec(device="tpu"))
    assert backend.setup(_spec(device="auto"))["device_type"] == "cpu"


def test_the_data_thread_pool_reaches_the_tf_data_pipelines_and_is_read_back(backend):
    from common.execution import ExecutionConfig

    data = TinyDataset()
    model, step, _ = _built(backend, _spec("seed_cnn", mode="auto", execution=ExecutionConfig("graph", data_threads=1)),
                            data)
    assert backend.audit(model, step)["data_threads"] == 1
    model, step, _ = _built(backend, _spec("seed_cnn"), data)
    assert backend.audit(model, step)["data_threads"] == 0  # tf.data's shared default pool


@pytest.mark.parametrize("model_name", list_models())
def test_audit_reads_back_every_key(backend, model_name):
    data = TinyDataset()
    recipe = Recipe(optimizer="adamw", weight_decay=0.05, weight_decay_mode="decoupled", adam_epsilon=1e-7,
                    bn_momentum=0.05, bn_epsilon=1e-4, label_smoothing=0.1)
    spec = _spec(model_name, recipe=recipe)
    model, step, _ = _built(backend, spec, data)
    assert isinstance(step, TrainStepProtocol)
    audit = backend.audit(model, step)
    assert set(audit) == (set(AUDIT_KEYS) - COMMON_KEYS) | set(DETAIL_KEYS)
    has_bn = model_name != "seed_cnn"
    assert audit["bn_momentum"] == (0.05 if has_bn else None)
    assert audit["bn_epsilon"] == (1e-4 if has_bn else None)
    assert audit["bn_running_variance"] == ("unbiased" if has_bn else None)
    assert audit["strided_conv_padding"] == "symmetric"
    assert (audit["optimizer"], audit["momentum"], audit["nesterov"]) == ("adamw", None, None)
    assert audit["weight_decay"] == 0.05 and audit["weight_decay_mode"] == "decoupled"
    assert audit["optimizer_epsilon"] == 1e-7 and audit["label_smoothing"] == 0.1
    assert audit["loss"] == "softmax_cross_entropy_from_logits"
    assert (audit["precision"], audit["tf32"], audit["loss_scaling"]) == ("fp32", False, None)
    assert (audit["device_type"], audit["execution_mode"], audit["data_format"]) == ("cpu", "graph", "NHWC")
    assert all(isinstance(audit[k], int) for k in ("intra_op_threads", "inter_op_threads"))


def test_audit_reports_sgd_and_fp16_loss_scaling(backend):
    spec = _spec("seed_cnn", precision="fp16", recipe=Recipe(momentum=0.8, nesterov=False, weight_decay=1e-4))
    model, step, _ = _built(backend, spec, TinyDataset())
    audit = backend.audit(model, step)
    assert (audit["optimizer"], audit["momentum"], audit["nesterov"]) == ("sgd", 0.8, False)
    assert audit["optimizer_epsilon"] is None and audit["weight_decay_mode"] == "coupled_l2"
    assert audit["precision"] == "fp16" and audit["loss_scaling"].startswith("dynamic (initial scale 65536")


def test_padding_audit_catches_keras_same_at_stride_2():
    inputs = keras.Input((8, 8, 3))
    outputs = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="bad")(inputs)
    assert strided_padding(keras.Model(inputs, outputs)).startswith("asymmetric (bad")


def test_measurement_hooks_on_the_cpu(backend):
    backend.setup(_spec())
    backend.synchronize()  # CPU: a no-op (TF ops run synchronously there)
    backend.reset_peak_memory()
    assert backend.peak_device_memory_bytes() is None
    assert backend.is_out_of_memory(tf.errors.ResourceExhaustedError(None, None, "OOM when allocating"))
    assert backend.is_out_of_memory(tf.errors.InternalError(None, None, "RESOURCE_EXHAUSTED: XLA alloc"))
    assert not backend.is_out_of_memory(ValueError("shapes"))
    versions = backend.versions()
    assert versions["tensorflow"] == tf.__version__ and versions["keras"] == keras.__version__
    assert backend.to_numpy(tf.constant([1.5])).tolist() == [1.5]


def test_shared_loop_trains_and_evaluates(backend):
    data = TinyDataset()
    spec = _spec()
    model, step, eval_step = _built(backend, spec, data)
    result = train(backend, step, eval_step, spec, len(data.train_labels), data.test_labels)
    assert result.status == "ok" and result.state.epoch == 2 and result.state.global_step == 6
    assert result.final_logits.shape == (20, 10) and result.final_logits.dtype == np.float32
    np.testing.assert_allclose(result.final_logits, backend.predict(model, _normalised_test(data, spec)),
                               rtol=1e-4, atol=1e-4)
    assert result.compile_s is not None and len(result.step_times_s) == 5
    assert int(step.optimizer_state()["step"]) == 6


def _normalised_test(data, spec):
    from common.sampler import normalize_reference

    return normalize_reference(data.test_images, spec.recipe.mean, spec.recipe.std)


def test_resume_from_saved_state_equals_an_uninterrupted_run(backend):
    data, spec = TinyDataset(), _spec()
    model, step, eval_step = _built(backend, spec, data)
    saved = {}

    def save(state):
        if state.epoch == 1:
            saved.update(weights=backend.get_weights(model), optimizer=step.optimizer_state(),
                         state=replace(state, epochs=list(state.epochs)))

    full = train(backend, step, eval_step, spec, len(data.train_labels), data.test_labels, on_epoch_end=save)
    backend2 = get_backend("tensorflow")  # a fresh process would build everything anew, then load
    model2, step2, eval_step2 = _built(backend2, spec, data)
    backend2.set_weights(model2, saved["weights"])
    step2.load_optimizer_state(saved["optimizer"])
    resumed = train(backend2, step2, eval_step2, spec, len(data.train_labels), data.test_labels,
                    state=saved["state"])
    assert resumed.state.global_step == full.state.global_step
    np.testing.assert_allclose(resumed.final_logits, full.final_logits, rtol=1e-5, atol=1e-5)
    after_full, after_resumed = backend.get_weights(model), backend2.get_weights(model2)
    for name, value in after_full.items():
        np.testing.assert_allclose(after_resumed[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.slow
def test_worker_subprocess_writes_a_result(tmp_path):
    """A fresh process: setup() really sets the thread pools; the run result is complete."""
    spec = RunSpec(model="seed_cnn", backend="tensorflow", data="synthetic:64,24", device="cpu", threads=2,
                   warmup_steps=0, recipe=Recipe(epochs=1, batch_size=16, eval_batch_size=10))
    spec_path, out_path = tmp_path / "spec.json", tmp_path / "out.json"
    spec_path.write_text(spec.to_json())
    env = {**os.environ, "DUALBENCH_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "tf_impl.worker", "train", str(spec_path), str(out_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out_path.read_text())
    assert result["status"] == "ok" and result["backend"] == "tensorflow"
    assert result["trainable_params"] == 5_096_074 and result["buffers"] == 0
    settings = result["settings"]
    assert settings["execution_mode"] == "graph" and settings["data_format"] == "NHWC"
    assert (settings["intra_op_threads"], settings["inter_op_threads"]) == (2, 2)
    assert settings["tf32"] is False and settings["bn_running_variance"] is None
    assert len(result["epochs"]) == 1 and 0.0 <= result["test_accuracy"] <= 1.0
    assert "DUALBENCH_EVENT" in proc.stdout
