"""Proof that the architectures match: counts, weight round trips, logits, per-layer activations.

The ladder, per model (mlcommons/algorithmic-efficiency style):
1. trainable parameters and BN buffers on both sides equal the framework-free spec;
2. exact weight round trip: canonical -> torch -> canonical -> keras -> canonical
   -> torch -> canonical, bit for bit;
3. logits after loading the same weights, eval mode and training mode (BN
   batch statistics), in both directions: torch's exported weights into Keras
   and Keras's exported weights into torch; the embeddings (penultimate
   features, eval mode: what retrieval ranks) likewise;
4. per-layer activations, naming the first layer that diverges.

Inputs are not friendly: images from N(0, 1) and every BN layer's gamma, beta,
moving mean and moving variance drawn at random (``unfriendly_weights``), so
eval-mode statistics do not match the activations and errors are not hidden
by unit-variance layers. The criterion is relative to the logit scale:
max |logit difference| <= ``DEFAULT_RTOL`` x max |logit| (fp32 results differ
in the last bits between CPU families, which an absolute bound ignores).

Each framework runs in its own subprocess (two phases: own export, then the
other side's weights).
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from common.architectures import PUBLISHED_PARAM_COUNTS, ArchSpec, arch_spec
from common.init import initial_weights
from common.parity import MODES, load_outputs
from common.registry import worker_command

BACKENDS = ("torch", "tensorflow")
# max |logit difference| / max |logit| allowed at fp32. The worst seen over all models, both BN modes and
# both directions is measured by tests/test_parity.py's inputs; the README quotes it per CPU family.
DEFAULT_RTOL = 1e-4
# A layer diverges when max|diff| > LAYER_RTOL * max|layer output| (both sides). Diagnostic only (names
# where a failing model first departs), and looser than the logit criterion: a training-mode BN over few
# values per channel (mobilenet_v2's 4x4 blocks) amplifies fp32 rounding that later layers shrink again.
LAYER_RTOL = 1e-3


def parity_images(in_shape: tuple[int, int, int], batch: int, seed: int) -> np.ndarray:
    """Normalised-image-like float32 NHWC inputs (standard normal)."""
    return np.random.default_rng([seed, 99]).standard_normal((batch, *in_shape)).astype(np.float32)


def unfriendly_weights(spec: ArchSpec, weights: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """``weights`` with every BN parameter and statistic drawn at random (other weights unchanged).

    gamma ~ U(0.5, 1.5), beta ~ N(0, 0.5), moving mean ~ N(0, 0.5), moving variance ~ U(0.5, 2):
    eval mode then neither centres nor whitens, and BN epsilon and padding mistakes show.
    """
    rng = np.random.default_rng([seed, 7])
    draw = {"gamma": lambda n: rng.uniform(0.5, 1.5, n), "beta": lambda n: rng.normal(0.0, 0.5, n),
            "moving_mean": lambda n: rng.normal(0.0, 0.5, n), "moving_variance": lambda n: rng.uniform(0.5, 2.0, n)}
    out = dict(weights)
    for layer in spec.layers:
        if layer.kind == "bn":
            for param, shape in layer.params.items():
                out[f"{layer.name}.{param}"] = draw[param](shape).astype(np.float32)
    return out


def relative_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max(|a|, |b|): the parity measure, relative to the output's scale."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(float(np.abs(a).max()), float(np.abs(b).max()), 1e-30)
    return float(np.abs(a - b).max()) / scale


def _run_phase(backend: str, request_dir: Path, out_dir: Path, timeout: float) -> None:
    command = [sys.executable, *worker_command(backend), "parity", str(request_dir), str(out_dir)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{backend} parity worker failed (exit {proc.returncode}):\n{tail}")


def _write_request(folder: Path, models: list[str], weights: dict[str, dict[str, np.ndarray]],
                   images: np.ndarray, num_classes: int, in_shape, threads: int | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "request.json").write_text(json.dumps({"models": models, "num_classes": num_classes,
                                                     "in_shape": list(in_shape), "threads": threads}))
    np.save(folder / "images.npy", images)
    for model in models:
        np.savez(folder / f"{model}.weights.npz", **weights[model])


def run_parity(models: list[str], *, num_classes: int = 10, in_shape=(32, 32, 3), batch: int = 8,
               seed: int = 0, init_scheme: str = "torch_default", rtol: float = DEFAULT_RTOL,
               threads: int | None = None, timeout: float = 900) -> list[dict[str, Any]]:
    """Run both phases in subprocesses and return one report dict per model."""
    images = parity_images(tuple(in_shape), batch, seed)
    specs = {m: arch_spec(m, num_classes, in_shape) for m in models}
    initial = {m: unfriendly_weights(specs[m], initial_weights(specs[m], init_scheme, seed), seed) for m in models}
    with tempfile.TemporaryDirectory(prefix="dualbench-parity-") as tmp:
        root = Path(tmp)
        _write_request(root / "request", models, initial, images, num_classes, in_shape, threads)
        for backend in BACKENDS:
            _run_phase(backend, root / "request", root / f"own_{backend}", timeout)
        own = {b: {m: load_outputs(root / f"own_{b}", m) for m in models} for b in BACKENDS}
        for backend, other in zip(BACKENDS, reversed(BACKENDS)):
            exported = {m: own[other][m]["weights"] for m in models}
            _write_request(root / f"cross_{backend}", models, exported, images, num_classes, in_shape, threads)
            _run_phase(backend, root / f"cross_{backend}", root / f"crossed_{backend}", timeout)
        crossed = {b: {m: load_outputs(root / f"crossed_{b}", m) for m in models} for b in BACKENDS}
    return [compare_model(m, initial[m], own["torch"][m], own["tensorflow"][m], crossed["torch"][m],
                          crossed["tensorflow"][m], num_classes, in_shape, rtol) for m in models]


def _diff(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float(d.max()), float(d.mean())


def _weights_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return set(a) == set(b) and all(a[k].shape == b[k].shape and np.array_equal(a[k], b[k]) for k in a)


def layer_table(model: str, layer_names: list[str], torch_layers: dict, tf_layers: dict,
                mode: str) -> list[dict[str, Any]]:
    """Per-layer max/mean abs difference in forward order (the spec's), with a 'diverged' flag."""
    rows = []
    for layer in layer_names:
        t, k = torch_layers.get(layer), tf_layers.get(layer)
        if t is None or k is None or np.shape(t) != np.shape(k):
            rows.append({"model": model, "mode": mode, "layer": layer, "max_abs_diff": None,
                         "mean_abs_diff": None, "max_abs_value": None, "diverged": True,
                         "note": f"shape torch {np.shape(t)} vs tensorflow {np.shape(k)}"})
            continue
        max_diff, mean_diff = _diff(t, k)
        rel = relative_diff(t, k)
        rows.append({"model": model, "mode": mode, "layer": layer, "max_abs_diff": max_diff,
                     "mean_abs_diff": mean_diff, "max_abs_value": float(np.abs(t).max()), "max_rel_diff": rel,
                     "diverged": rel > LAYER_RTOL, "note": ""})
    return rows


def first_divergence(rows: list[dict[str, Any]]) -> str | None:
    for row in rows:
        if row["diverged"]:
            return row["layer"]
    return None


def compare_model(model: str, initial: dict, own_torch: dict, own_tf: dict, crossed_torch: dict,
                  crossed_tf: dict, num_classes: int, in_shape, rtol: float = DEFAULT_RTOL) -> dict[str, Any]:
    """The parity report of one model from the four backend outputs."""
    spec = arch_spec(model, num_classes, in_shape)
    expected = spec.trainable_param_count()
    report: dict[str, Any] = {
        "model": model, "spec_trainable_params": expected,
        "published_params": PUBLISHED_PARAM_COUNTS.get(model) if tuple(in_shape) == (32, 32, 3) else None,
        "torch_trainable_params": own_torch["trainable_params"], "tf_trainable_params": own_tf["trainable_params"],
        "torch_buffers": own_torch["buffers"], "tf_buffers": own_tf["buffers"],
        "spec_buffers": spec.buffer_count(), "macs_per_image": spec.macs(),
    }
    report["counts_match"] = (report["torch_trainable_params"] == report["tf_trainable_params"] == expected
                              and report["torch_buffers"] == report["tf_buffers"] == spec.buffer_count())
    report["round_trip_exact"] = (_weights_equal(own_torch["weights"], initial)
                                  and _weights_equal(own_tf["weights"], initial)
                                  and _weights_equal(crossed_tf["weights"], own_torch["weights"])
                                  and _weights_equal(crossed_torch["weights"], own_tf["weights"]))
    report["forward_unchanged_weights"] = all(o["weights_unchanged"] for o in (own_torch, own_tf))
    worst, worst_rel = 0.0, 0.0
    for mode in MODES:
        pairs = {"same_weights": (own_torch, own_tf),
                 "torch_into_tf": (own_torch, crossed_tf),  # Keras loaded torch's exported weights
                 "tf_into_torch": (crossed_torch, own_tf)}  # torch loaded Keras's exported weights
        for direction, (t, k) in pairs.items():
            max_diff, mean_diff = _diff(t[f"logits_{mode}"], k[f"logits_{mode}"])
            rel = relative_diff(t[f"logits_{mode}"], k[f"logits_{mode}"])
            report[f"{mode}_{direction}_max_abs_diff"] = max_diff
            report[f"{mode}_{direction}_mean_abs_diff"] = mean_diff
            report[f"{mode}_{direction}_max_rel_diff"] = rel
            worst, worst_rel = max(worst, max_diff), max(worst_rel, rel)
        rows = layer_table(model, [layer.name for layer in spec.layers], own_torch.get(f"layers_{mode}", {}),
                           own_tf.get(f"layers_{mode}", {}), mode)
        report[f"layers_{mode}"] = rows
        report[f"first_divergent_layer_{mode}"] = first_divergence(rows)
    for direction, (t, k) in {"same_weights": (own_torch, own_tf), "torch_into_tf": (own_torch, crossed_tf),
                              "tf_into_torch": (crossed_torch, own_tf)}.items():
        if "embeddings" in t and "embeddings" in k:  # penultimate features, eval mode (Backend.embed)
            rel = relative_diff(t["embeddings"], k["embeddings"])
            report[f"embedding_{direction}_max_rel_diff"] = rel
            worst_rel = max(worst_rel, rel)
    report["max_abs_diff"], report["max_rel_diff"] = worst, worst_rel
    report["rtol"] = rtol
    published_ok = report["published_params"] in (None, expected)
    report["passed"] = bool(report["counts_match"] and report["round_trip_exact"] and published_ok
                            and report["forward_unchanged_weights"] and worst_rel <= rtol)
    return report
