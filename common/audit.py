"""The fairness audit: effective settings each backend reports, and their comparison.

Backends read these values back from the objects they built (layers,
optimizer, loss, data pipelines, framework flags), never from the recipe, so a
mapping bug shows up as an asymmetry. ``MUST_MATCH`` keys make a run unfair
when they differ; ``NATIVE`` keys are expected to differ (each framework's own
best layout or execution mode) and are listed for the reader. ``DETAIL_KEYS``
are long values (lists) kept in audit.json beside the table, not compared.

Helpers shared by both backends (``single_value``, ``decay_settings``,
``normalization_text``) live here so that the two read-backs summarise the
same facts the same way.
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterable, Sequence

MUST_MATCH = (
    "init_scheme",  # initial weights: common.init scheme (loaded into both)
    "trainable_params",  # trainable values in the built model
    "bn_momentum",  # torch convention (keras momentum = 1 - this), the one value of every BN layer
    "bn_epsilon",  # the one value of every BN layer
    "bn_running_variance",  # "unbiased" (torch) or "biased" (keras)
    "strided_conv_padding",  # "symmetric" on both
    "dropout",  # rate of the built dropout layer(s); None without one
    "optimizer",  # update rule of the built optimizer: sgd | adam | adamw (adam with decoupled decay)
    "momentum",  # SGD momentum (torch semantics)
    "nesterov",
    "adam_beta1",  # Adam/AdamW first-moment decay; None for SGD
    "adam_beta2",  # Adam/AdamW second-moment decay; None for SGD
    "optimizer_epsilon",  # Adam epsilon, added after sqrt(v_hat) (torch placement)
    "weight_decay",  # the coefficient of the parameters that decay (0.0: none does)
    "weight_decay_mode",  # coupled_l2 | decoupled; None when no parameter decays
    "decayed_param_count",  # parameters (tensors) the optimizer decays
    "decayed_param_digest",  # sha256 of their sorted canonical names (the list: audit.json details)
    "decay_bn_and_bias",  # whether BN parameters and biases decay (None: nothing decays, or none exist)
    "lr_schedule",  # computed in common.schedules, fed per step
    "loss",  # "softmax_cross_entropy_from_logits", named by the loss object the step calls
    "label_smoothing",  # read from the loss object the step calls
    "loss_scaling",  # fp16 dynamic loss scaling: initial scale and growth interval; None otherwise
    "precision",  # fp32 | bf16 | fp16 compute dtype
    "tf32",
    "deterministic",
    "intra_op_threads",
    "batch_size",  # training images per step (common.sampler plans every batch)
    "eval_batch_size",  # read from the built evaluation pipeline
    "crop_padding",  # read from the built training pipeline
    "augmentation",  # what the built training pipeline applies: random crop (pad), horizontal flip
    "input_normalization",  # per-channel mean/std held by the built pipelines
    "data_fingerprint",
    "sampler_seed",
    "device_type",  # cpu | gpu
)
NATIVE = (
    "device",  # resolved device name
    # Each framework's execution configuration, chosen per machine by compare.tune (--mode auto):
    "execution_config",  # the configuration requested and how it was chosen (search, cache, pin, fallback)
    "execution_mode",  # eager / compile / graph / xla / jit_compile
    "execution_style",  # custom (the hand-written step) | fit (Keras's compile + fit)
    "data_format",  # NCHW, channels_last, NHWC
    "onednn",  # oneDNN kernels: TF's IsMklEnabled(), torch.backends.mkldnn (read back)
    "host_allocator",  # glibc malloc tuning the worker started with (common.execution.MALLOC_TUNING)
    "inter_op_threads",  # 0 = the framework's default (one per core)
    "data_threads",  # tf.data private thread pool (0 = tf.data's default); torch builds batches in the step's thread
    "input_pipeline",  # where the dataset lives and how batches reach the device
    "fallbacks",  # what this process could not apply as asked ("none" when everything was)
)
# Data-parallel runs only (common.distributed.audit_settings); a single-process run reports none of
# them, so a key is compared only when some backend reports it.
DISTRIBUTED_MUST_MATCH = (
    "world_size",  # replicas = processes
    "global_batch_size",  # per-replica batch x world size
    "lr_scaling",  # none | linear, with the peak LR it gives
    "data_sharding",  # how the lockstep plan is split between replicas
    "gradient_reduction",  # "mean over N replicas", read back from DDP / the strategy
    "bn_statistics",  # per-replica batch and moving statistics, evaluation with replica 0's
    "pipeline_threads",  # threads the input pipeline may use per process (torch: intra-op; tf.data: its pool)
)
DISTRIBUTED_NATIVE = (
    "engine",  # torch.distributed DDP / tf.distribute MultiWorkerMirroredStrategy
    "collective_backend",  # gloo, nccl, ring
)
AUDIT_KEYS = MUST_MATCH + NATIVE
DISTRIBUTED_KEYS = DISTRIBUTED_MUST_MATCH + DISTRIBUTED_NATIVE
DETAIL_KEYS = ("decayed_param_names",)  # lists kept in audit.json per backend, not compared
MIXED_PREFIX = "mixed "  # a value that differs between layers: an asymmetry on its own


def single_value(values: Iterable[Any]) -> Any:
    """The one value all layers share; None without layers; "mixed [...]" (flagged) otherwise."""
    distinct = set(values)
    if not distinct:
        return None
    if len(distinct) == 1:
        return next(iter(distinct))
    return f"{MIXED_PREFIX}{sorted(distinct, key=repr)}"


def names_digest(names: Iterable[str]) -> str:
    """First 16 hex digits of the sha256 of the sorted names, one per line."""
    return hashlib.sha256("\n".join(sorted(names)).encode("utf-8")).hexdigest()[:16]


def decay_settings(decayed: Sequence[str], trainable: Sequence[str]) -> dict[str, Any]:
    """The decay rows from the canonical names a built optimizer decays, out of all trainable ones.

    ``decay_bn_and_bias`` is read from those names: True when every non-kernel
    parameter (BN gamma/beta, biases) decays, False when none does, None when
    nothing decays or the model has no such parameter, "mixed ..." otherwise.
    """
    others = [n for n in trainable if not n.endswith(".kernel")]
    decayed_others = [n for n in decayed if not n.endswith(".kernel")]
    if not decayed or not others:
        flag: Any = None
    elif len(decayed_others) == len(others):
        flag = True
    elif not decayed_others:
        flag = False
    else:
        flag = f"{MIXED_PREFIX}({len(decayed_others)} of {len(others)} BN/bias parameters decay)"
    return {"decayed_param_count": len(decayed), "decayed_param_digest": names_digest(decayed),
            "decay_bn_and_bias": flag, "decayed_param_names": sorted(decayed)}


def normalization_text(mean: Sequence[float], std: Sequence[float]) -> str:
    """Per-channel mean/std as text, 6 significant digits (the float32 values both pipelines hold)."""
    def fmt(values: Sequence[float]) -> str:
        return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ")"
    return f"mean {fmt(mean)} std {fmt(std)}"


def fallbacks_text(notes: Sequence[str]) -> str:
    """The audit value of a backend's fallback notes."""
    return "; ".join(notes) if notes else "none"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-12 * max(1.0, abs(a), abs(b))
    return a == b


def _mixed(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(MIXED_PREFIX)


def compare_settings(settings: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per audit key: each backend's value and whether it is an asymmetry.

    ``settings`` maps backend name -> its reported settings. A MUST_MATCH key
    whose values differ, that a backend failed to report, or whose value is
    mixed across the layers of one model, is flagged. The DISTRIBUTED_KEYS
    (data-parallel runs) get rows only when some backend reports them, and are
    then judged the same way.
    """
    backends = sorted(settings)
    reported = {key for values in settings.values() for key in values}
    rows = []
    for key in AUDIT_KEYS + tuple(k for k in DISTRIBUTED_KEYS if k in reported):
        values = {b: settings[b].get(key, "<not reported>") for b in backends}
        distinct = list(values.values())
        equal = all(_same(distinct[0], v) for v in distinct[1:])
        missing = any(v == "<not reported>" for v in distinct)
        row = {"setting": key, **values,
               "kind": "must match" if key in MUST_MATCH + DISTRIBUTED_MUST_MATCH else "framework-native"}
        row["asymmetry"] = row["kind"] == "must match" and (not equal or missing or any(map(_mixed, distinct)))
        rows.append(row)
    return rows


def details(settings: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The DETAIL_KEYS values per backend (for audit.json), e.g. the decayed parameter names."""
    return {b: {k: s[k] for k in DETAIL_KEYS if k in s} for b, s in settings.items()}


def asymmetries(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["asymmetry"]]
