"""The fairness audit: effective settings each backend reports, and their comparison.

Backends read these values back from the objects they built (layers,
optimizer, framework flags), not from the recipe, so a mapping bug shows up
as an asymmetry. ``MUST_MATCH`` keys make a run unfair when they differ;
``NATIVE`` keys are expected to differ (each framework's own best layout or
execution mode) and are listed for the reader.
"""
from __future__ import annotations

from typing import Any

MUST_MATCH = (
    "init_scheme",  # initial weights: common.init scheme (loaded into both)
    "bn_momentum",  # torch convention (keras momentum = 1 - this)
    "bn_epsilon",
    "bn_running_variance",  # "unbiased" (torch) or "biased" (keras)
    "strided_conv_padding",  # "symmetric" on both
    "optimizer",
    "momentum",
    "nesterov",
    "weight_decay",
    "weight_decay_mode",  # coupled_l2 | decoupled
    "optimizer_epsilon",  # Adam epsilon, added after sqrt(v_hat) (torch placement)
    "lr_schedule",  # computed in common.schedules, fed per step
    "loss",  # "softmax_cross_entropy_from_logits"
    "label_smoothing",
    "precision",  # fp32 | bf16 | fp16 compute dtype
    "tf32",
    "deterministic",
    "intra_op_threads",
    "batch_size",
    "data_fingerprint",
    "sampler_seed",
    "device_type",  # cpu | gpu
    "host_allocator",  # glibc malloc tuning the worker started with (common.manifest.MALLOC_TUNING)
)
NATIVE = (
    "device",  # resolved device name
    "execution_mode",  # eager / compile / graph / xla
    "data_format",  # NCHW, channels_last, NHWC
    "inter_op_threads",
    "loss_scaling",  # fp16 only
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
    "data_threads",  # threads the input pipeline may use per process
)
DISTRIBUTED_NATIVE = (
    "engine",  # torch.distributed DDP / tf.distribute MultiWorkerMirroredStrategy
    "collective_backend",  # gloo, nccl, ring
)
AUDIT_KEYS = MUST_MATCH + NATIVE
DISTRIBUTED_KEYS = DISTRIBUTED_MUST_MATCH + DISTRIBUTED_NATIVE


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-12 * max(1.0, abs(a), abs(b))
    return a == b


def compare_settings(settings: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per audit key: each backend's value and whether it is an asymmetry.

    ``settings`` maps backend name -> its reported settings. A MUST_MATCH key
    whose values differ, or that a backend failed to report, is flagged. The
    DISTRIBUTED_KEYS (data-parallel runs) get rows only when some backend reports
    them, and are then judged the same way.
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
        row["asymmetry"] = row["kind"] == "must match" and (not equal or missing)
        rows.append(row)
    return rows


def asymmetries(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["asymmetry"]]
