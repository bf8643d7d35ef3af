"""Deployment: which artifacts each framework exports, and the arithmetic that verifies and times them.

Framework-free. The processes that make, verify and serve artifacts are the
worker tasks of common.deploy_worker; compare.export starts them and uses the
functions here to judge what they return:

* ``compare_logits``: max abs / max relative difference (relative to the
  logit scale, max|reference|: the project's parity measure) and top-1
  agreement of an artifact's logits with the framework's own eval logits;
* ``diagnose``: what differs when they do not agree (batch statistics, i.e. BN
  in training mode; a transposed layout);
* ``latency_summary``: batch-1 p50/p90/p99 and batch-64 throughput over the
  serving rounds of one artifact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

NATIVE_RTOL = 1e-5  # float32 ONNX and native formats: max|diff| / max|logit| (the threshold)
LITERT_RTOL = 1e-4  # LiteRT: its kernels (XNNPACK) reassociate more sums
MIN_TOP1_AGREEMENT = 0.999  # fraction of images whose top-1 class equals the reference's
CROSS_RTOL = 1e-4  # torch's ONNX vs TensorFlow's ONNX from the same weights (the parity tolerance)
# Probes behind ``diagnose``: a change above this (relative to the logit scale) is "different"
# and a match within it is "the same" (far above float32 noise, far below a real difference).
PROBE_RTOL = 1e-3
PROBE_IMAGES = 8  # images run one at a time and transposed by the verifier


@dataclass(frozen=True)
class Format:
    """One artifact format of one framework."""

    backend: str  # the framework that exports it
    name: str  # "torch_export", "onnx", "saved_model", "keras", "litert"
    file: str  # file (or folder) name inside the job's export folder
    runtime: str  # what loads it: "torch", "tensorflow", "keras", "onnxruntime", "litert"
    layout: str  # image layout the artifact takes: "NCHW" or "NHWC"
    rtol: float  # verification tolerance (max relative logit difference)


FORMATS: tuple[Format, ...] = (
    Format("torch", "torch_export", "model.pt2", "torch", "NCHW", NATIVE_RTOL),
    Format("torch", "onnx", "model.onnx", "onnxruntime", "NCHW", NATIVE_RTOL),
    Format("tensorflow", "saved_model", "saved_model", "tensorflow", "NHWC", NATIVE_RTOL),
    Format("tensorflow", "onnx", "model.onnx", "onnxruntime", "NHWC", NATIVE_RTOL),
    Format("tensorflow", "keras", "model.keras", "keras", "NHWC", NATIVE_RTOL),
    Format("tensorflow", "litert", "model.tflite", "litert", "NHWC", LITERT_RTOL),
)
FORMAT_NAMES = tuple(dict.fromkeys(f.name for f in FORMATS))
FRAMEWORK_MODULES = ("torch", "tensorflow", "keras")  # what an ONNX/LiteRT serving process must not load


def formats_of(backend: str, names: list[str] | None = None) -> list[Format]:
    """The formats ``backend`` exports (all, or those in ``names``), in FORMATS order."""
    return [f for f in FORMATS if f.backend == backend and (names is None or f.name in names)]


def format_of(backend: str, name: str) -> Format:
    found = formats_of(backend, [name])
    if not found:
        raise ValueError(f"{backend} has no export format {name!r}")
    return found[0]


def to_layout(images_nhwc: np.ndarray, layout: str) -> np.ndarray:
    """Contiguous float32 images in ``layout`` ("NHWC" or "NCHW") from NHWC images."""
    images = np.asarray(images_nhwc, np.float32)
    if layout == "NCHW":
        images = images.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(images)


def compare_logits(reference: np.ndarray, logits: np.ndarray) -> dict[str, Any]:
    """Max abs and max relative (to max|reference|) difference, top-1 agreement, image count."""
    reference, logits = np.asarray(reference, np.float64), np.asarray(logits, np.float64)
    if reference.shape != logits.shape:
        return {"images": len(logits), "max_abs_diff": None, "max_rel_diff": None, "top1_agreement": None,
                "shape_error": f"logits have shape {list(logits.shape)}, the reference {list(reference.shape)}"}
    if not np.isfinite(logits).all():
        return {"images": len(logits), "max_abs_diff": None, "max_rel_diff": None, "top1_agreement": None,
                "shape_error": "logits contain NaN or inf"}
    diff = float(np.abs(logits - reference).max()) if logits.size else 0.0
    scale = float(np.abs(reference).max()) if reference.size else 0.0
    agreement = float(np.mean(logits.argmax(1) == reference.argmax(1))) if len(logits) else 1.0
    return {"images": len(logits), "max_abs_diff": diff, "max_rel_diff": diff / scale if scale > 0 else diff,
            "top1_agreement": agreement}


def failures(metrics: dict[str, Any], rtol: float, min_agreement: float = MIN_TOP1_AGREEMENT) -> list[str]:
    """Why ``metrics`` (from compare_logits) fail the thresholds; [] when they pass."""
    if metrics.get("shape_error"):
        return [metrics["shape_error"]]
    out = []
    if metrics["max_rel_diff"] > rtol:
        out.append(f"max relative difference {metrics['max_rel_diff']:.2e} > {rtol:g} "
                   f"(max abs {metrics['max_abs_diff']:.2e})")
    if metrics["top1_agreement"] < min_agreement:
        out.append(f"top-1 agreement {metrics['top1_agreement']:.2%} < {min_agreement:.1%}")
    return out


def diagnose(reference: np.ndarray, batched: np.ndarray, single: np.ndarray | None,
             transposed: np.ndarray | None) -> list[str]:
    """What differs, from the verifier's probes on the first images.

    ``batched``: the artifact's logits of the first images run in one batch;
    ``single``: the same images run one at a time; ``transposed``: the same
    images with H and W swapped (None for non-square images). An eval-mode
    model gives an image the same logits whatever else is in its batch, and a
    correct layout gives the reference logits only for the images as given.
    """
    notes = []
    scale = max(float(np.abs(reference).max()), 1e-12)
    if single is not None:
        change = float(np.abs(np.asarray(single, np.float64) - batched).max()) / scale
        if change > PROBE_RTOL:
            notes.append(f"an image's logits change with the other images in its batch (by up to {change:.1e} "
                         "of the logit scale): the artifact uses batch statistics, e.g. BatchNorm exported in "
                         "training mode")
    if transposed is not None and len(reference) >= len(transposed):
        as_given = float(np.abs(np.asarray(batched, np.float64) - reference[:len(batched)]).max()) / scale
        swapped = float(np.abs(np.asarray(transposed, np.float64) - reference[:len(transposed)]).max()) / scale
        if swapped <= PROBE_RTOL < as_given:
            notes.append("it computes the reference logits when the images are transposed (H and W swapped): "
                         "the artifact reads a transposed layout")
    return notes


def percentile_ms(samples_s: list[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation) of seconds, in milliseconds; None without samples."""
    return float(np.percentile(np.asarray(samples_s, np.float64), q) * 1e3) if samples_s else None


def latency_summary(rounds: list[dict[str, Any]], batch: int) -> dict[str, Any]:
    """Serving figures of one artifact over its rounds (one serving process each).

    Latency percentiles pool every timed batch-1 call of every round;
    throughput is ``batch`` images times the timed calls over their summed
    time, per round, and the median of the rounds is reported; load time and
    peak RSS are the median of the rounds.
    """
    calls = [t for r in rounds for t in r["batch1_s"]]
    throughputs = [batch * len(r["batch_s"]) / sum(r["batch_s"]) for r in rounds if r["batch_s"]]

    def median(key: str) -> float | None:
        values = [r[key] for r in rounds if r.get(key) is not None]
        return float(np.median(values)) if values else None

    return {"latency_p50_ms": percentile_ms(calls, 50), "latency_p90_ms": percentile_ms(calls, 90),
            "latency_p99_ms": percentile_ms(calls, 99), "batch1_calls": len(calls),
            "round_p50_ms": [percentile_ms(r["batch1_s"], 50) for r in rounds],
            f"batch{batch}_img_s": float(np.median(throughputs)) if throughputs else None,
            "import_s": median("import_s"), "load_s": median("load_s"), "first_call_s": median("first_call_s"),
            "peak_rss_bytes": median("peak_rss_bytes"), "rounds": len(rounds)}
