"""A numpy backend for runner/report tests: fast, framework-free, with injectable misbehaviour.

Registered only in tests, through the registry's extra-backends variable::

    DUALBENCH_EXTRA_BACKENDS="fakea=tests.fake_backend:FakeBackend;fakeb=tests.fake_backend:FakeBackend"

The model is multinomial logistic regression on 8x8-average-pooled images,
trained by real SGD steps (momentum, coupled L2, label smoothing), so accuracy
rises on the synthetic dataset. The canonical initial weights the worker loads
(of the named CNN) are accepted and ignored: the fake model starts at zero, and
``get_weights``/``set_weights`` use the fake's own names ``fake.kernel``/``fake.bias``
(which is what a checkpoint stores and a resume loads back).

Misbehaviour, from ``DUALBENCH_FAKE_FAULT`` = "TARGET:KIND[@STEP];...":
TARGET is ``*``, ``seedN``, a backend name, ``backend/seedN`` or ``rankN`` (one process of a
data-parallel launch); KIND is
``segfault`` (SIGSEGV at training step STEP, default 1), ``hang`` (sleeps at
that step), ``diverge`` (NaN loss at that step), ``error`` (RuntimeError),
``oom`` (MemoryError -> status oom), ``bind`` (rank 0 of a data-parallel launch binds MASTER_PORT
at setup, as torch's TCPStore does, and fails like it when the port is taken), ``oombatch@N`` (MemoryError in every step when
the batch size is >= N: an out-of-memory boundary for `dualbench bench`), ``slow`` (0.2 s per step), ``asym``
(reports bn_epsilon 1e-3 in the audit), ``wrong=KEY`` (reports a different value of audit key KEY),
``fallback`` (notes a fallback), ``audit_segfault`` (SIGSEGV while auditing) or ``embedshift``
(embeddings 1% larger: two frameworks that disagree on identical weights). Faults in training steps
never fire in ``audit`` workers, which build but do not train.

``DUALBENCH_FAKE_LAUNCH_LOG``: each worker appends "audit|train|tune RUN_ID PID" there.

Execution configurations (compare.tune searches the fake's ``SEARCH_SPACE``): a
training step sleeps ``FAKE_STEP_S`` divided by the speed-ups that
``DUALBENCH_FAKE_TUNE`` = "FIELD=VALUE:xFACTOR[:wrong];..." gives the run's
configuration (``mode=compile:x3`` makes compile three times as fast); ``wrong``
shifts that configuration's logits and losses, so the correctness gate must
exclude it. Without the variable a step does not sleep.

Data-parallel launches (``--nproc N``): each process reads its rank from torchrun's
variables (what compare.launch gives a non-TensorFlow backend) and trains its shard
alone: the fake has no engine and no collectives. It exercises the launcher, the
watchdog and the chief-only writing, never gradient averaging.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any, Iterator

import numpy as np

from common.backend import residency_summary
from common.audit import decay_settings, fallbacks_text, normalization_text
from common.config import RunSpec
from common.distributed import Replica, single_process
from common.execution import ExecutionConfig, requested
from common.sampler import EpochPlan, augmentation_text, normalize_reference, plan_batch_reference
from compare.tune import Dimension, SearchSpace

FAULT_ENV = "DUALBENCH_FAKE_FAULT"
LAUNCH_LOG_ENV = "DUALBENCH_FAKE_LAUNCH_LOG"
TUNE_ENV = "DUALBENCH_FAKE_TUNE"
POOL = 8  # pixels averaged per feature along each axis
FAKE_STEP_S = 0.03  # a step's sleep at speed 1 when DUALBENCH_FAKE_TUNE is set
WRONG_OFFSET = 0.5  # added to the logits and losses of a configuration marked wrong
SEARCH_SPACE = SearchSpace(
    reference=ExecutionConfig("eager", channels_last=False, malloc_tuning=False),
    start=ExecutionConfig("eager", channels_last=False, malloc_tuning=False),
    dimensions=(Dimension("malloc_tuning", (False, True), per_model=False),
                Dimension("channels_last", (False, True)),
                Dimension("mode", ("eager", "compile", "xla"))))


def tune_effects(config: ExecutionConfig) -> tuple[float, bool]:
    """(speed-up, wrong) of ``config`` under $DUALBENCH_FAKE_TUNE (speed-up 0: not set, no sleeping)."""
    text = os.environ.get(TUNE_ENV)
    if not text:
        return 0.0, False
    speed, wrong = 1.0, False
    for item in filter(None, text.split(";")):
        setting, _, effect = item.partition(":")
        name, _, value = setting.partition("=")
        if str(getattr(config, name.strip())) == value.strip():
            factor, _, flag = effect.partition(":")
            speed *= float(factor.strip().lstrip("x"))
            wrong = wrong or flag.strip() == "wrong"
    return speed, wrong


def faults_for(spec: RunSpec) -> dict[str, int]:
    """{kind: step} of the faults in $DUALBENCH_FAKE_FAULT that target this run."""
    targets = {"*", f"seed{spec.seed}", spec.backend, f"{spec.backend}/seed{spec.seed}"}
    if spec.world_size > 1:
        targets.add(f"rank{os.environ.get('RANK', '0')}")
    found = {}
    for item in filter(None, os.environ.get(FAULT_ENV, "").split(";")):
        target, _, kind = item.partition(":")
        kind, _, step = kind.partition("@")
        if target.strip() in targets:
            found[kind.strip()] = int(step) if step else 1
    return found


def pooled_features(images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) float -> (N, H/POOL * W/POOL * C) block means."""
    n, h, w, c = images.shape
    blocks = images[:, : h // POOL * POOL, : w // POOL * POOL].reshape(n, h // POOL, POOL, w // POOL, POOL, c)
    return blocks.mean(axis=(2, 4)).reshape(n, -1).astype(np.float64)


class FakeModel:
    def __init__(self, features: int, classes: int, bn_momentum: float, bn_epsilon: float):
        self.kernel = np.zeros((features, classes))
        self.bias = np.zeros(classes)
        self.bn_momentum, self.bn_epsilon = bn_momentum, bn_epsilon

    def logits(self, images: np.ndarray) -> np.ndarray:
        return pooled_features(images) @ self.kernel + self.bias


class FakeTrainStep:
    """SGD with momentum on softmax cross-entropy, plus the configured faults."""

    def __init__(self, model: FakeModel, spec: RunSpec):
        self.model, self.spec, self.faults = model, spec, faults_for(spec)
        self.speed, self.wrong = tune_effects(requested(spec))
        self.buffers = {"kernel": np.zeros_like(model.kernel), "bias": np.zeros_like(model.bias)}
        self.step = 0

    def _fault(self) -> None:
        f = self.faults
        if self.speed:
            time.sleep(FAKE_STEP_S / self.speed)
        if f.get("slow"):
            time.sleep(0.2)
        if f.get("segfault") == self.step:
            print("fake backend: simulating a segmentation fault", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGSEGV)
        if f.get("hang") == self.step:
            print("fake backend: simulating a hang", file=sys.stderr, flush=True)
            time.sleep(3600)
        if f.get("error") == self.step:
            raise RuntimeError("fake backend: simulated failure in a training step")
        if f.get("oom") == self.step:
            raise MemoryError("fake backend: simulated out of memory")
        if "oombatch" in f and self.spec.recipe.batch_size >= f["oombatch"]:
            raise MemoryError(f"fake backend: batch {self.spec.recipe.batch_size} does not fit")

    def __call__(self, images: np.ndarray, labels: np.ndarray, lr: float):
        self.step += 1
        self._fault()
        r, m = self.spec.recipe, self.model
        x = pooled_features(images)
        z = x @ m.kernel + m.bias
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        k = p.shape[1]
        target = np.full_like(p, r.label_smoothing / k)
        target[np.arange(len(labels)), labels] += 1.0 - r.label_smoothing
        loss = float(-(target * np.log(p + 1e-12)).sum(axis=1).mean())
        if self.faults.get("diverge") == self.step:
            loss = float("nan")
        loss += WRONG_OFFSET if self.wrong else 0.0
        grad_z = (p - target) / len(labels)
        grads = {"kernel": x.T @ grad_z + r.weight_decay * m.kernel, "bias": grad_z.sum(axis=0) + r.weight_decay * m.bias}
        for name, grad in grads.items():
            buf = self.buffers[name]
            buf *= r.momentum
            buf += grad
            update = grad + r.momentum * buf if r.nesterov else buf
            setattr(m, name, getattr(m, name) - lr * update)
        correct = int((z.argmax(axis=1) == labels).sum())
        return np.float32(loss), np.int64(correct)

    def optimizer_state(self) -> dict[str, np.ndarray]:
        return {"momentum/fake.kernel": self.buffers["kernel"].copy(),
                "momentum/fake.bias": self.buffers["bias"].copy(), "step": np.array(self.step)}

    def load_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        self.buffers = {"kernel": np.array(state["momentum/fake.kernel"]),
                        "bias": np.array(state["momentum/fake.bias"])}
        self.step = int(state["step"])


class FakeBackend:
    """common.backend.Backend in numpy (see the module docstring)."""

    name = "fake"

    def setup(self, spec: RunSpec) -> dict[str, Any]:
        self.spec, self.name = spec, spec.backend
        if "bind" in faults_for(spec) and spec.world_size > 1 and os.environ.get("RANK") == "0":
            import socket

            self._store = socket.socket()  # held for the process's life, like a store's listening socket
            self._store.bind(("127.0.0.1", int(os.environ["MASTER_PORT"])))  # OSError: Address already in use
        log = os.environ.get(LAUNCH_LOG_ENV)
        if log:
            task = next((t for t in ("audit", "tune") if t in sys.argv[2:3]), "train")
            with open(log, "a", encoding="utf-8") as handle:
                handle.write(f"{task} {spec.run_id()} {os.getpid()}\n")
        self.execution = requested(spec)
        return {"device": "cpu", "mode": self.execution.mode, "threads": spec.threads or 1}

    def versions(self) -> dict[str, str]:
        return {"fake": "1.0", "numpy": np.__version__}

    def replica(self) -> Replica:
        if self.spec.world_size == 1:
            return single_process()
        world = int(os.environ["WORLD_SIZE"])
        return Replica(rank=int(os.environ["RANK"]), world_size=world, local_rank=int(os.environ["LOCAL_RANK"]),
                       engine="fake (no collectives)", hosts=(single_process().hosts[0],) * world)

    def finish(self) -> None:
        pass

    def build_model(self, name: str, num_classes: int, in_shape: tuple[int, int, int],
                    bn_momentum: float = 0.1, bn_epsilon: float = 1e-5, dropout: float | None = None) -> FakeModel:
        h, w, c = in_shape
        return FakeModel((h // POOL) * (w // POOL) * c, num_classes, bn_momentum, bn_epsilon)

    def trainable_param_count(self, model: FakeModel) -> int:
        return int(model.kernel.size + model.bias.size)

    def buffer_count(self, model: FakeModel) -> int:
        return 0

    def get_weights(self, model: FakeModel) -> dict[str, np.ndarray]:
        return {"fake.kernel": model.kernel.copy(), "fake.bias": model.bias.copy()}

    def set_weights(self, model: FakeModel, weights: dict[str, np.ndarray]) -> None:
        if "fake.kernel" in weights:  # our own checkpoint; canonical CNN weights are ignored
            assert weights["fake.kernel"].shape == model.kernel.shape
            model.kernel, model.bias = np.array(weights["fake.kernel"]), np.array(weights["fake.bias"])

    def predict(self, model: FakeModel, images_nhwc_float32: np.ndarray, training: bool = False) -> np.ndarray:
        return model.logits(images_nhwc_float32).astype(np.float32)

    def embed(self, model: FakeModel, images_nhwc_float32: np.ndarray) -> np.ndarray:
        features = pooled_features(images_nhwc_float32).astype(np.float32)  # what the fake's classifier reads
        return features * np.float32(1.01) if "embedshift" in faults_for(self.spec) else features

    def layer_outputs(self, model: FakeModel, images_nhwc_float32: np.ndarray, training: bool = False):
        return {"fake": self.predict(model, images_nhwc_float32)}

    def attach_data(self, dataset: Any, spec: RunSpec) -> None:
        self.dataset = dataset

    def _normalize(self, images: np.ndarray) -> np.ndarray:
        return normalize_reference(images, self.spec.recipe.mean, self.spec.recipe.std)

    def train_batches(self, plan: EpochPlan, raw: bool = False) -> Iterator[tuple[Any, Any]]:
        for index, (start, stop) in enumerate(plan.batch_bounds()):
            images = plan_batch_reference(self.dataset.train_images, plan, index)
            labels = self.dataset.train_labels[plan.order[start:stop]]
            yield (images if raw else self._normalize(images)), labels

    def eval_batches(self, raw: bool = False) -> Iterator[tuple[Any, Any]]:
        size = self.spec.recipe.eval_batch_size
        for start in range(0, len(self.dataset.test_labels), size):
            images = self.dataset.test_images[start:start + size]
            yield (images if raw else self._normalize(images)), self.dataset.test_labels[start:start + size]

    def make_train_step(self, model: FakeModel, spec: RunSpec) -> FakeTrainStep:
        return FakeTrainStep(model, spec)

    def make_eval_step(self, model: FakeModel):
        if tune_effects(self.execution)[1]:
            return lambda images: model.logits(images) + WRONG_OFFSET
        return model.logits

    def to_numpy(self, value: Any) -> np.ndarray:
        return np.asarray(value)

    def fallback_notes(self) -> list[str]:
        return ["fake backend: simulated fallback"] if "fallback" in faults_for(self.spec) else []

    def audit(self, model: FakeModel, train_step: FakeTrainStep) -> dict[str, Any]:
        r, spec = self.spec.recipe, self.spec
        names = ["fake.kernel", "fake.bias"]
        settings = {
            "trainable_params": self.trainable_param_count(model),
            "bn_momentum": model.bn_momentum, "bn_epsilon": model.bn_epsilon, "bn_running_variance": "unbiased",
            "strided_conv_padding": "symmetric", "dropout": None, "optimizer": r.optimizer, "momentum": r.momentum,
            "nesterov": r.nesterov, "adam_beta1": None, "adam_beta2": None, "weight_decay": r.weight_decay,
            "weight_decay_mode": r.weight_decay_mode if r.weight_decay else None,
            **decay_settings(names if r.weight_decay else [], names),
            "optimizer_epsilon": None, "loss": "softmax_cross_entropy_from_logits",
            "label_smoothing": r.label_smoothing, "loss_scaling": None, "precision": spec.precision,
            "tf32": spec.allow_tf32, "deterministic": spec.deterministic, "intra_op_threads": spec.threads or 1,
            "eval_batch_size": r.eval_batch_size, "crop_padding": r.crop_padding,
            "input_normalization": normalization_text(r.mean, r.std), "device_type": "cpu",
            "device": "cpu", "execution_mode": self.execution.mode,
            "data_format": "NHWC channels_last" if self.execution.channels_last else "NHWC",
            "inter_op_threads": self.execution.inter_op_threads or 0, "onednn": self.execution.onednn,
            "data_threads": self.execution.data_threads,
            # the fake has no pipelines of its own: what it applies is the recipe's plan (plan_batch_reference)
            "augmentation": augmentation_text(r.crop_padding, r.augment, r.augment and r.horizontal_flip),
            "input_pipeline": "numpy arrays in host memory", "fallbacks": fallbacks_text(self.fallback_notes()),
        }
        faults = faults_for(spec)
        if "asym" in faults:
            settings["bn_epsilon"] = 1e-3
        for kind in faults:
            if kind.startswith("wrong="):
                key = kind.partition("=")[2]
                settings[key] = f"<broken {key}>"
        if "audit_segfault" in faults:  # audit() also runs in training workers (common.worker.build)
            os.kill(os.getpid(), signal.SIGSEGV)
        return settings

    def synchronize(self) -> None:
        pass

    def reset_peak_memory(self) -> None:
        pass

    def peak_device_memory_bytes(self) -> int | None:
        return None  # CPU: not measured (never 0)

    def data_residency(self) -> dict[str, Any]:
        # batches are cut straight from common.data's arrays: the fake holds no copy of its own
        return residency_summary({"train_images": ("host", 0), "train_labels": ("host", 0),
                                  "test_images": ("host", 0), "test_labels": ("host", 0)})

    def is_out_of_memory(self, error: BaseException) -> bool:
        return isinstance(error, MemoryError)


if __name__ == "__main__":  # the fake's worker: python -m tests.fake_backend NAME TASK ARGS
    from common.worker import main

    sys.exit(main(sys.argv[1], sys.argv[2:]))
