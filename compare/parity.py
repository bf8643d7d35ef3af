"""Proof that the architectures match: counts, weight round trips, logits, per-layer activations.

The ladder, per model (mlcommons/algorithmic-efficiency style), every backend against torch (the
reference whose conventions the contract fixes):
1. trainable parameters and BN buffers on every side equal the framework-free spec;
2. exact weight round trip: canonical -> torch -> canonical -> other -> canonical
   -> torch -> canonical, bit for bit, for every other backend;
3. logits after loading the same weights, eval mode and training mode (BN
   batch statistics), in both directions: torch's exported weights into the
   other backend and the other's exported weights into torch; the non-reference
   backends also against each other on the same weights (tensorflow vs
   keras-torch: the same Keras code on two frameworks); the embeddings
   (penultimate features, eval mode: what retrieval ranks) likewise;
4. per-layer activations, naming the first layer that diverges.

Inputs are not friendly: images from N(0, 1) and every BN layer's gamma, beta,
moving mean and moving variance drawn at random (``unfriendly_weights``), so
eval-mode statistics do not match the activations and errors are not hidden
by unit-variance layers. The criterion is relative to the logit scale:
max |logit difference| <= ``DEFAULT_RTOL`` x max |logit| (fp32 results differ
in the last bits between CPU families, which an absolute bound ignores).

Each framework runs in its own subprocess (two phases: own export, then the
other side's weights).

Report keys name backends by short aliases (``ALIASES``): ``tf_trainable_params``,
``eval_torch_into_kt_max_rel_diff``, ``train_same_weights_tf_max_rel_diff`` ...
"""
from __future__ import annotations

import itertools
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
from compare.process import worker_env

BACKENDS = ("torch", "tensorflow")  # the default pair; any REAL_BACKENDS subset that holds torch works
REFERENCE = "torch"
ALIASES = {"torch": "torch", "tensorflow": "tf", "keras-torch": "kt"}  # in report keys
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
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=worker_env())
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
               threads: int | None = None, timeout: float = 900,
               backends: tuple[str, ...] = BACKENDS) -> list[dict[str, Any]]:
    """Run every phase in subprocesses and return one report dict per model (``compare_model``).

    Phases: each backend on the shared weights (own); each other backend on torch's export;
    torch on each other backend's export.
    """
    if REFERENCE not in backends or len(backends) < 2:
        raise ValueError(f"parity compares backends against {REFERENCE}: give it and at least one other")
    others = [b for b in backends if b != REFERENCE]
    images = parity_images(tuple(in_shape), batch, seed)
    specs = {m: arch_spec(m, num_classes, in_shape) for m in models}
    initial = {m: unfriendly_weights(specs[m], initial_weights(specs[m], init_scheme, seed), seed) for m in models}
    with tempfile.TemporaryDirectory(prefix="dualbench-parity-") as tmp:
        root = Path(tmp)
        _write_request(root / "request", models, initial, images, num_classes, in_shape, threads)
        for backend in backends:
            _run_phase(backend, root / "request", root / f"own_{backend}", timeout)
        own = {b: {m: load_outputs(root / f"own_{b}", m) for m in models} for b in backends}
        for source, target in [(REFERENCE, b) for b in others] + [(b, REFERENCE) for b in others]:
            exported = {m: own[source][m]["weights"] for m in models}
            request = root / f"cross_{source}_into_{target}"
            _write_request(request, models, exported, images, num_classes, in_shape, threads)
            _run_phase(target, request, root / f"crossed_{source}_into_{target}", timeout)
        into_other = {b: {m: load_outputs(root / f"crossed_{REFERENCE}_into_{b}", m) for m in models} for b in others}
        into_torch = {b: {m: load_outputs(root / f"crossed_{b}_into_{REFERENCE}", m) for m in models} for b in others}
    return [compare_model(m, initial[m], {b: own[b][m] for b in backends}, {b: into_other[b][m] for b in others},
                          {b: into_torch[b][m] for b in others}, num_classes, in_shape, rtol) for m in models]


def _diff(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float(d.max()), float(d.mean())


def _weights_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return set(a) == set(b) and all(a[k].shape == b[k].shape and np.array_equal(a[k], b[k]) for k in a)


def layer_table(model: str, layer_names: list[str], torch_layers: dict, other_layers: dict,
                mode: str, other: str = "tensorflow") -> list[dict[str, Any]]:
    """Per-layer max/mean abs difference, torch vs ``other``, in forward order (the spec's), with a 'diverged' flag."""
    rows = []
    for layer in layer_names:
        t, k = torch_layers.get(layer), other_layers.get(layer)
        base = {"model": model, "pair": f"torch vs {other}", "mode": mode, "layer": layer}
        if t is None or k is None or np.shape(t) != np.shape(k):
            rows.append({**base, "max_abs_diff": None, "mean_abs_diff": None, "max_abs_value": None,
                         "diverged": True, "note": f"shape torch {np.shape(t)} vs {other} {np.shape(k)}"})
            continue
        max_diff, mean_diff = _diff(t, k)
        rel = relative_diff(t, k)
        rows.append({**base, "max_abs_diff": max_diff, "mean_abs_diff": mean_diff,
                     "max_abs_value": float(np.abs(t).max()), "max_rel_diff": rel, "diverged": rel > LAYER_RTOL,
                     "note": ""})
    return rows


def first_divergence(rows: list[dict[str, Any]]) -> str | None:
    for row in rows:
        if row["diverged"]:
            return row["layer"]
    return None


def _logit_pairs(own: dict[str, dict], into_other: dict[str, dict], into_torch: dict[str, dict]
                 ) -> dict[str, tuple[dict, dict]]:
    """direction name -> (outputs, outputs) whose logits must agree."""
    pairs = {}
    for other in into_other:
        alias = ALIASES.get(other, other)
        pairs[f"same_weights_{alias}"] = (own[REFERENCE], own[other])
        pairs[f"torch_into_{alias}"] = (own[REFERENCE], into_other[other])  # other loaded torch's export
        pairs[f"{alias}_into_torch"] = (into_torch[other], own[other])  # torch loaded the other's export
    for first, second in itertools.combinations(list(into_other), 2):  # e.g. the same Keras code on two backends
        pairs[f"same_weights_{ALIASES.get(first, first)}_{ALIASES.get(second, second)}"] = (own[first], own[second])
    return pairs


def compare_model(model: str, initial: dict, own: dict[str, dict], into_other: dict[str, dict],
                  into_torch: dict[str, dict], num_classes: int, in_shape, rtol: float = DEFAULT_RTOL
                  ) -> dict[str, Any]:
    """The parity report of one model from the backends' outputs.

    ``own[b]``: backend b on the shared weights (torch among them); ``into_other[b]``: b on torch's
    export; ``into_torch[b]``: torch on b's export (one entry per backend other than torch).
    """
    spec = arch_spec(model, num_classes, in_shape)
    expected = spec.trainable_param_count()
    report: dict[str, Any] = {
        "model": model, "backends": list(own), "spec_trainable_params": expected,
        "published_params": PUBLISHED_PARAM_COUNTS.get(model) if tuple(in_shape) == (32, 32, 3) else None,
        **{f"{ALIASES.get(b, b)}_trainable_params": o["trainable_params"] for b, o in own.items()},
        **{f"{ALIASES.get(b, b)}_buffers": o["buffers"] for b, o in own.items()},
        "spec_buffers": spec.buffer_count(), "macs_per_image": spec.macs(),
    }
    report["counts_match"] = all(o["trainable_params"] == expected and o["buffers"] == spec.buffer_count()
                                 for o in own.values())
    report["round_trip_exact"] = (all(_weights_equal(o["weights"], initial) for o in own.values())
                                  and all(_weights_equal(into_other[b]["weights"], own[REFERENCE]["weights"])
                                          and _weights_equal(into_torch[b]["weights"], own[b]["weights"])
                                          for b in into_other))
    report["forward_unchanged_weights"] = all(o["weights_unchanged"] for o in own.values())
    worst, worst_rel = 0.0, 0.0
    for mode in MODES:
        for direction, (a, b) in _logit_pairs(own, into_other, into_torch).items():
            max_diff, mean_diff = _diff(a[f"logits_{mode}"], b[f"logits_{mode}"])
            rel = relative_diff(a[f"logits_{mode}"], b[f"logits_{mode}"])
            report[f"{mode}_{direction}_max_abs_diff"] = max_diff
            report[f"{mode}_{direction}_mean_abs_diff"] = mean_diff
            report[f"{mode}_{direction}_max_rel_diff"] = rel
            worst, worst_rel = max(worst, max_diff), max(worst_rel, rel)
        rows = [row for other in into_other for row in layer_table(
            model, [layer.name for layer in spec.layers], own[REFERENCE].get(f"layers_{mode}", {}),
            own[other].get(f"layers_{mode}", {}), mode, other)]
        report[f"layers_{mode}"] = rows
        report[f"first_divergent_layer_{mode}"] = first_divergence(rows)
    for direction, (a, b) in _logit_pairs(own, into_other, into_torch).items():
        if "embeddings" in a and "embeddings" in b:  # penultimate features, eval mode (Backend.embed)
            rel = relative_diff(a["embeddings"], b["embeddings"])
            report[f"embedding_{direction}_max_rel_diff"] = rel
            worst_rel = max(worst_rel, rel)
    report["max_abs_diff"], report["max_rel_diff"] = worst, worst_rel
    report["rtol"] = rtol
    published_ok = report["published_params"] in (None, expected)
    report["passed"] = bool(report["counts_match"] and report["round_trip_exact"] and published_ok
                            and report["forward_unchanged_weights"] and worst_rel <= rtol)
    return report
