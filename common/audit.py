"""The fairness audit: effective settings each backend reports, and their comparison.

Backends read these values back from the objects they built (layers,
optimizer, framework flags), not from the recipe, so a mapping bug shows up
as an asymmetry. ``MUST_MATCH`` keys make a run unfair when they differ;
``NATIVE`` keys are expected to differ (each framework's own best layout or
execution mode) and are listed for the reader.
"""
from __future__ import annotations

from typing import Any, Sequence

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
    "augmentation",  # what the built training pipeline applies: random crop (pad), horizontal flip
    "input_normalization",  # per-channel mean/std held by the built pipelines
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
AUDIT_KEYS = MUST_MATCH + NATIVE


def normalization_text(mean: Sequence[float], std: Sequence[float]) -> str:
    """Per-channel mean/std as text, 6 significant digits (the float32 values the pipelines hold)."""
    def fmt(values: Sequence[float]) -> str:
        return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ")"
    return f"mean {fmt(mean)} std {fmt(std)}"


def pipeline_settings(train: Any, evaluation: Any) -> dict[str, Any]:
    """``augmentation`` and ``input_normalization`` read back from a backend's built pipelines.

    ``train``/``evaluation`` expose ``augmentation()`` / ``normalization()`` (torch_impl.data and
    tf_impl.data alike). Normalisation that differs between the two pipelines is reported as
    "mixed ...", which compare_settings flags.
    """
    if train is None or evaluation is None:
        return {}
    texts = {normalization_text(*train.normalization()), normalization_text(*evaluation.normalization())}
    normalization = texts.pop() if len(texts) == 1 else f"mixed {sorted(texts)}"
    return {"augmentation": train.augmentation(), "input_normalization": normalization}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-12 * max(1.0, abs(a), abs(b))
    return a == b


def compare_settings(settings: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per audit key: each backend's value and whether it is an asymmetry.

    ``settings`` maps backend name -> its reported settings. A MUST_MATCH key
    whose values differ, or that a backend failed to report, is flagged.
    """
    backends = sorted(settings)
    rows = []
    for key in AUDIT_KEYS:
        values = {b: settings[b].get(key, "<not reported>") for b in backends}
        distinct = list(values.values())
        equal = all(_same(distinct[0], v) for v in distinct[1:])
        missing = any(v == "<not reported>" for v in distinct)
        row = {"setting": key, **values,
               "kind": "must match" if key in MUST_MATCH else "framework-native"}
        mixed = any(isinstance(v, str) and v.startswith("mixed ") for v in distinct)
        row["asymmetry"] = key in MUST_MATCH and (not equal or missing or mixed)
        rows.append(row)
    return rows


def asymmetries(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["asymmetry"]]
