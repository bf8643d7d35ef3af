"""The backend contract: what torch_impl.backend and tf_impl.backend implement.

The documentation lives here; the implementations stay thin. All arrays that
cross this boundary are numpy in the canonical layouts of common.weights
(images NHWC float32 or uint8, weights HWIO/(in,out), labels int64).
Framework tensors only appear as opaque values returned by the data
iterators and the compiled steps, which the loop passes straight back.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Protocol, runtime_checkable

import numpy as np

from common.config import RunSpec
from common.distributed import Replica
from common.sampler import EpochPlan


@runtime_checkable
class TrainStep(Protocol):
    """One compiled optimisation step with its optimizer state.

    ``step(images, labels, lr)`` runs forward, loss (from logits, with the
    recipe's label smoothing), backward and the update with learning rate
    ``lr`` (a Python float chosen by common.schedules), and returns
    ``(mean_loss, correct_count)`` as framework scalars: no host sync inside.
    """

    def __call__(self, images: Any, labels: Any, lr: float) -> tuple[Any, Any]: ...

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """Optimizer slots (canonical weight names with a prefix, e.g. 'momentum/conv1.kernel') and 'step'."""

    def load_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        """Inverse of optimizer_state (for resume)."""


@runtime_checkable
class Backend(Protocol):
    """One framework behind the shared interface."""

    name: str  # "torch" or "tensorflow"

    # -- environment ---------------------------------------------------------
    def setup(self, spec: RunSpec) -> dict[str, Any]:
        """Apply device, threads, precision, TF32, determinism (and TF memory growth).

        Returns the effective settings read back from the framework (resolved
        device name, mode, channels_last, thread counts...). Raises
        common.errors.UserError for an unusable device.
        """

    def versions(self) -> dict[str, str]:
        """Library versions that matter for this backend (framework, CUDA, cuDNN...)."""

    def replica(self) -> Replica:
        """This process's place in the run, after ``setup`` (common.distributed).

        ``setup`` joins the framework's own engine when ``spec.world_size > 1``
        (torch.distributed + DDP; tf.distribute MultiWorkerMirroredStrategy), from the
        environment the launcher gave (torchrun's variables; TF_CONFIG). Then models are
        built under the engine, the train step averages gradients over the replicas and
        returns the GLOBAL mean loss and correct count, and ``audit`` adds the
        data-parallel rows (common.distributed.audit_settings).
        """

    def finish(self) -> None:
        """Leave the engine after a last barrier (every rank reached the end); no-op for one process."""

    def fallback_notes(self) -> list[str]:
        """One line per thing this process could not apply as asked (a thread pool that had
        already started, a data path that is unavailable), with what ran instead.

        Nothing falls back silently: these lines go into the audit (``fallbacks``)
        and the run's manifest; an empty list means everything applied as asked.
        """

    # -- model ---------------------------------------------------------------
    def build_model(self, name: str, num_classes: int, in_shape: tuple[int, int, int],
                    bn_momentum: float = 0.1, bn_epsilon: float = 1e-5, dropout: float | None = None) -> Any:
        """The model ``name`` for NHWC ``in_shape``; bn_momentum in torch convention.

        ``dropout``: the rate of the dropout layer of models that have one (None:
        the architecture's own, common.architectures); models without one ignore it.
        """

    def trainable_param_count(self, model: Any) -> int: ...

    def buffer_count(self, model: Any) -> int:
        """Non-trainable values (BN moving statistics), counted apart from trainable ones."""

    def get_weights(self, model: Any) -> dict[str, np.ndarray]:
        """All weights in the canonical layout and names (common.architectures)."""

    def set_weights(self, model: Any, weights: dict[str, np.ndarray]) -> None:
        """Load canonical weights; shapes are asserted before every copy."""

    def predict(self, model: Any, images_nhwc_float32: np.ndarray, training: bool = False) -> np.ndarray:
        """Logits as numpy; eval mode (BN moving statistics) unless ``training``."""

    def embed(self, model: Any, images_nhwc_float32: np.ndarray) -> np.ndarray:
        """float32 (N, D) penultimate-layer features in eval mode: the input of the classifier
        (common.architectures.EMBEDDING_LAYER), D = ``arch_spec.embedding_dim()``. Batched
        internally; the model is left unchanged. What image retrieval ranks (common.retrieval)."""

    def layer_outputs(self, model: Any, images_nhwc_float32: np.ndarray, training: bool = False) -> dict[str, np.ndarray]:
        """Activations after every weight-owning layer, keyed by canonical layer name, NHWC numpy."""

    # -- training ------------------------------------------------------------
    def attach_data(self, dataset: Any, spec: RunSpec) -> None:
        """Build the native train/eval pipelines over common.data.Dataset arrays."""

    def train_batches(self, plan: EpochPlan, raw: bool = False) -> Iterator[tuple[Any, Any]]:
        """Batches of ``plan`` (order, crops, flips from common.sampler), prefetched to the device.

        ``raw=True`` yields uint8 NHWC images before normalisation (for parity tests);
        otherwise normalised float images in the model's native layout.
        """

    def eval_batches(self, raw: bool = False) -> Iterator[tuple[Any, Any]]:
        """The whole test set in order, in batches of recipe.eval_batch_size, no augmentation."""

    def make_train_step(self, model: Any, spec: RunSpec) -> TrainStep: ...

    def make_eval_step(self, model: Any) -> Callable[[Any], Any]:
        """A compiled function images -> logits (eval mode)."""

    def to_numpy(self, value: Any) -> np.ndarray: ...

    def audit(self, model: Any, train_step: TrainStep) -> dict[str, Any]:
        """Effective settings read back from the built objects, never from the recipe.

        Keys: common.audit.AUDIT_KEYS (minus the spec-level ones common.worker adds)
        plus common.audit.DETAIL_KEYS; call after ``attach_data`` (the pipelines are audited too).
        """

    # -- measurement ---------------------------------------------------------
    def synchronize(self) -> None:
        """Block until queued device work is done (called before every clock read)."""

    def reset_peak_memory(self) -> None: ...

    def peak_device_memory_bytes(self) -> int | None:
        """Device allocator peak since the last reset; None on CPU (never 0 for 'not measured')."""

    def data_residency(self) -> dict[str, Any]:
        """Where the attached pipelines keep the dataset, and the bytes they hold for it.

        ``residency_summary`` of ``{array: (where, bytes)}`` over the train and eval
        pipelines' arrays, where is "host" or "device". Bytes are those of the copies the
        backend made (tensors, variables): an array that is a view of common.data's own
        numpy arrays (which every backend process keeps alike) counts 0. So
        ``host_peak_rss - host_bytes`` and ``device_peak - device_bytes`` compare the
        training's own memory, whatever each framework's data placement.
        """

    def is_out_of_memory(self, error: BaseException) -> bool: ...


def residency_summary(arrays: dict[str, tuple[str, int]]) -> dict[str, Any]:
    """``Backend.data_residency()``'s dict from ``{array name: (where, bytes)}`` (where: "host" | "device").

    Keys: ``train_data`` (where the training images live), ``host_bytes``,
    ``device_bytes`` (totals per place) and ``arrays`` (``{name: [where, bytes]}``).
    """
    places = {where for where, _ in arrays.values()}
    if not places <= {"host", "device"}:
        raise ValueError(f"data lives 'host' or 'device', got {sorted(places)}")
    return {"train_data": arrays["train_images"][0],
            "host_bytes": sum(int(n) for where, n in arrays.values() if where == "host"),
            "device_bytes": sum(int(n) for where, n in arrays.values() if where == "device"),
            "arrays": {name: [where, int(n)] for name, (where, n) in arrays.items()}}
