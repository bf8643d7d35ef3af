"""Cross-framework training parity, step by step (common.step_parity does the work in each worker).

Every backend is compared with torch, each framework in its own worker
process: torch trains the cases freely; each other backend trains them freely
and replays every torch step from torch's state; one more torch process
replays every step of the other backends from their states. ``step_rows``
compares each replayed step with the original one made from the same state
(the pass/fail criterion); ``trajectory_rows`` compares the free runs (a figure
of how far fp32 noise carries, never a gate). A case runs on the backends its
``modes`` name.

Data-parallel cases (``nproc`` > 1: torch DDP against tf.distribute
MultiWorkerMirroredStrategy) run each phase as a launch of ``nproc`` ranks
(compare.launch, the runner's own launcher); every rank's states come back, so
the per-replica BN statistics are compared replica by replica.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from common.config import Recipe
from common.optim_reference import ReferenceOptimizer, decays
from common.registry import worker_command
from common.schedules import lr_at
from common.step_parity import case_arch, case_recipe, case_spec, load_states, state_file
from compare.process import stderr_tail, worker_env

BACKENDS = ("torch", "tensorflow", "keras-torch")
REFERENCE = "torch"
# Per-step criteria (fp32, TF32 off, determinism on), see step_rows. Loss, BN statistics and the update
# rule are deterministic functions of the state and agree to fp32 rounding: tight. Gradients are not: a
# ReLU/ReLU6 input within rounding of a kink takes a different side on another CPU's kernels and reroutes
# part of the gradient (tests/test_training_parity.py prints the measured worst per case); the grad
# criterion is loose and per case, and the tight ones carry the semantics.
STEP_TOLERANCE = {"update_rule_rel": 1e-4, "loss_rel": 1e-4, "bn_rel": 1e-4, "grad_rel": 2e-2}
_STEPS = 10
_SGD = dict(optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=5e-3, weight_decay_mode="coupled_l2",
            lr=0.02, schedule="onecycle", epochs=1, batch_size=32, label_smoothing=0.1)
# adam_epsilon 1e-6 rather than 1e-8: large enough next to sqrt(v_hat) that Keras's placement (before
# the bias correction: an effective epsilon ~30x larger at step 1) would change the update visibly.
_ADAMW = dict(optimizer="adamw", weight_decay=0.05, weight_decay_mode="decoupled", lr=1e-3, schedule="onecycle",
              epochs=1, batch_size=32, adam_epsilon=1e-6)
_EAGER = {"torch": "eager", "tensorflow": "graph", "keras-torch": "eager"}
# name -> case: model, input size, recipe (Recipe fields), execution modes, steps. Every LR schedule here
# changes the LR at every step (one-cycle), so an LR folded into the momentum buffer would show.
CASES: dict[str, dict[str, Any]] = {
    "resnet20_32px_sgd": dict(model="resnet20", hw=32, recipe=_SGD, modes=_EAGER),
    "resnet20_8px_sgd": dict(model="resnet20", hw=8, recipe=_SGD, modes=_EAGER),
    "resnet20_8px_adamw": dict(model="resnet20", hw=8, recipe=_ADAMW, modes=_EAGER),
    "resnet20_8px_sgd_no_bn_bias_decay": dict(model="resnet20", hw=8, recipe={**_SGD, "decay_bn_and_bias": False},
                                              modes=_EAGER),
    "seed_cnn_16px_sgd": dict(model="seed_cnn", hw=16, recipe=_SGD, modes=_EAGER),
    "mobilenet_v2_8px_adamw": dict(model="mobilenet_v2", hw=8, recipe={**_ADAMW, "dropout": 0.0}, modes=_EAGER,
                                   grad_tolerance=1e-1),  # BN over 32 values per channel after stride 8
    "resnet20_8px_sgd_compiled": dict(model="resnet20", hw=8, recipe=_SGD,
                                      modes={"torch": "compile", "tensorflow": "xla", "keras-torch": "jit_compile"}),
}


def make_case(base: str, steps: int = _STEPS, **changes: Any) -> dict[str, Any]:
    """A JSON-ready case from CASES[base] (recipe validated through Recipe); ``changes`` replace keys
    (``name``, ``overrides`` = per-backend recipe fields...)."""
    case = {**CASES[base], "name": base, "steps": steps, **changes}
    case["recipe"] = dataclasses.asdict(Recipe(**case["recipe"]))
    return case


def _run(backend: str, request_dir: Path, out_dir: Path, timeout: float, case: dict[str, Any]) -> None:
    """One phase: a worker process, or ``case["nproc"]`` ranks of a data-parallel launch."""
    if case.get("nproc", 1) > 1:
        _run_ranks(backend, request_dir, out_dir, timeout, case)
        return
    command = [sys.executable, *worker_command(backend), "step-parity", str(request_dir), str(out_dir)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=worker_env())
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{backend} step-parity worker failed (exit {proc.returncode}):\n{tail}")


def _run_ranks(backend: str, request_dir: Path, out_dir: Path, timeout: float, case: dict[str, Any]) -> None:
    from compare.launch import launch_local

    logs = out_dir.parent / f"{out_dir.name}-{backend}-logs"
    run = launch_local(case_spec(case, backend), lambda rank: ["step-parity", str(request_dir), str(out_dir)],
                       lambda rank: logs / f"rank{rank}.log", worker_env(), timeout_s=timeout)
    failed = [(rank, o) for rank, o in zip(run.ranks, run.outcome.ranks) if o.returncode != 0]
    if failed or run.outcome.timed_out:
        tails = "\n".join(f"rank {rank} (exit {o.returncode}, {o.signal_name or 'no signal'}):\n"
                          + stderr_tail(logs / f"rank{rank}.log", 15) for rank, o in failed)
        raise RuntimeError(f"{backend} step-parity ranks failed:\n{tails}")


def run_cases(cases: list[dict[str, Any]], timeout: float = 1800,
              backends: tuple[str, ...] = BACKENDS) -> dict[str, dict[str, Any]]:
    """Free runs and replays of every case, every backend against torch in both directions:
    {case: {"free": {backend: (states, losses)}, "replay": {"<replayer>_from_<source>": (states, losses)}}}.

    A case runs on the backends among ``backends`` that its ``modes`` name (a backend no case
    names starts no process). The cases of one call share their process count (``nproc``); with
    several ranks the result is rank 0's, and ``"ranks"`` holds every rank's ({"free", "replay"}
    each, by rank).
    """
    nprocs = {case.get("nproc", 1) for case in cases}
    if len(nprocs) != 1:
        raise ValueError(f"the cases of one run_cases call share nproc, got {sorted(nprocs)}")
    world = nprocs.pop()
    named = {b: next((case for case in cases if b in case["modes"]), None) for b in backends}
    others = [b for b in backends if b != REFERENCE and named[b] is not None]
    with tempfile.TemporaryDirectory(prefix="dualbench-step-parity-") as tmp:
        root = Path(tmp)
        folders = {b: root / b for b in (REFERENCE, *others)}
        folders[REFERENCE].mkdir()
        (folders[REFERENCE] / "request.json").write_text(json.dumps({"cases": cases}))
        _run(REFERENCE, folders[REFERENCE], folders[REFERENCE], timeout, cases[0])  # torch: free runs
        reference_replay = {"source": REFERENCE, "states": str(folders[REFERENCE])}
        for other in others:  # free run + replay of torch's states
            (folders[other] / "request").mkdir(parents=True)
            (folders[other] / "request" / "request.json").write_text(
                json.dumps({"cases": cases, "replays": [reference_replay]}))
            _run(other, folders[other] / "request", folders[other], timeout, named[other])
        replays = root / "torch_replays"
        replays.mkdir()
        if others and any(case.get("replay", True) for case in cases):
            (replays / "request.json").write_text(json.dumps({"cases": cases, "free_run": False, "replays": [
                {"source": other, "states": str(folders[other])} for other in others]}))
            _run(REFERENCE, replays, replays, timeout, cases[0])  # torch: replay of every other backend's states
        out = {}
        for case in cases:
            ranks = [_collect(case, rank, folders, replays, others) for rank in range(world)]
            out[case["name"]] = {**ranks[0], "ranks": ranks} if world > 1 else ranks[0]
        return out


def _collect(case: dict[str, Any], rank: int, folders: dict[str, Path], replays: Path,
             others: list[str]) -> dict[str, Any]:
    """One rank's free runs and replays of one case (no replays for a case with ``"replay": false``)."""
    name, replayed = case["name"], case.get("replay", True)
    out: dict[str, Any] = {"free": {REFERENCE: load_states(folders[REFERENCE] / state_file(name, rank, "free"))},
                           "replay": {}}
    for other in others:
        if not (folders[other] / state_file(name, rank, "free")).exists():
            continue  # the case gives this backend no mode
        out["free"][other] = load_states(folders[other] / state_file(name, rank, "free"))
        if replayed:
            out["replay"][f"{other}_from_{REFERENCE}"] = load_states(
                folders[other] / state_file(name, rank, f"replay_{REFERENCE}"))
            out["replay"][f"{REFERENCE}_from_{other}"] = load_states(
                replays / state_file(name, rank, f"replay_{other}"))
    return out


def _vector(state: dict[str, np.ndarray], keys: list[str]) -> np.ndarray:
    return np.concatenate([np.asarray(state[k], np.float64).ravel() for k in keys]) if keys else np.zeros(0)


def _rel(diff: np.ndarray, scale: np.ndarray) -> float:
    return float(np.linalg.norm(diff) / max(np.linalg.norm(scale), 1e-30))


def _reference_step(state: dict[str, np.ndarray], after: dict[str, np.ndarray], recipe: Recipe, lr: float,
                    names: list[str]) -> dict[str, np.ndarray]:
    """The weights and slots common.optim_reference makes from ``state`` with the gradient this side used.

    The gradient is recovered from the side's own slot update (SGD: buf' - m*buf, which already holds
    a coupled L2 term; Adam: (m' - b1*m) / (1 - b1)), so this checks the update rule itself (LR
    placement, momentum and Nesterov, decay mode and flags, epsilon, bias correction) free of the
    fp32 noise in the gradients, which the cross-framework slot comparison judges separately.
    """
    reference = ReferenceOptimizer(recipe)
    reference.t = int(state["o/step"])
    params, grads = {}, {}
    for name in names:
        w = np.asarray(state[f"w/{name}"], np.float64)
        if recipe.optimizer == "sgd":
            old, new = (np.asarray(s[f"o/momentum/{name}"], np.float64) for s in (state, after))
            grad = new - recipe.momentum * old
            if decays(name, recipe) and recipe.weight_decay_mode == "coupled_l2":
                grad = grad - recipe.weight_decay * w  # the reference adds it back
            reference.slots[name] = {"momentum": old}
        else:
            old_m, new_m = (np.asarray(s[f"o/m/{name}"], np.float64) for s in (state, after))
            grad = (new_m - recipe.adam_beta1 * old_m) / (1.0 - recipe.adam_beta1)
            if decays(name, recipe) and recipe.weight_decay_mode == "coupled_l2":
                grad = grad - recipe.weight_decay * w
            reference.slots[name] = {"m": old_m, "v": np.asarray(state[f"o/v/{name}"], np.float64)}
        params[name], grads[name] = w, grad
    updated = reference.step(params, grads, lr)
    out = {f"w/{name}": value for name, value in updated.items()}
    for name, slots in reference.slots.items():
        out.update({f"o/{slot}/{name}": value for slot, value in slots.items()})
    return out


def _beyond_rounding(got: np.ndarray, want: np.ndarray, scale: np.ndarray) -> float:
    """|got - want| beyond float32 storage rounding (one ulp of every stored value), over |scale|.

    A weight of 0.05 stored in float32 cannot resolve an update smaller than ~4e-9, so the
    difference W' - W of a small step carries ~1e-4 of relative rounding in any framework.
    """
    floor = np.linalg.norm(np.spacing(np.abs(got).astype(np.float32)).astype(np.float64))
    return max(0.0, float(np.linalg.norm(got - want)) - floor) / max(float(np.linalg.norm(scale)), 1e-30)


def update_rule_rel(state: dict[str, np.ndarray], after: dict[str, np.ndarray], recipe: Recipe, lr: float,
                     names: list[str]) -> float:
    """|W' - W'_reference| / |W'_reference - W| over the trainable weights, and likewise for every slot
    (relative to the slot), both beyond float32 rounding."""
    want = _reference_step(state, after, recipe, lr, names)
    weights = [f"w/{n}" for n in names]
    slots = sorted(k for k in want if k.startswith("o/"))
    got_w, want_w = _vector(after, weights), _vector(want, weights)
    worst = _beyond_rounding(got_w, want_w, want_w - _vector(state, weights))
    if slots:
        got_s, want_s = _vector(after, slots), _vector(want, slots)
        worst = max(worst, _beyond_rounding(got_s, want_s, want_s))
    return worst


def step_rows(case: dict[str, Any], result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (direction, step): the replayed step against the original made from the same state.

    * ``update_rule_rel``: each side's step against common.optim_reference from the same state
      (worst of the two sides; ``_reference_step``);
    * ``grad_rel``: |slots_B - slots_A| / |slots_A| after the step (both started from the same
      slots, so this compares the gradients, i.e. forward, loss and backward);
    * ``loss_rel``: |loss_B - loss_A| / |loss_A|;
    * ``bn_rel``: the BN moving statistics' change, |dS_B - dS_A| / |dS_A|;
    * ``update_rel`` (reported, not judged on its own): |W_B - W_A| / |W_A - W_before|. Adam turns
      the fp32 noise of a parameter whose true gradient is zero into a full +-lr step (a BN shift
      that the next BN cancels), so this can be large while every judged quantity agrees.
    """
    arch, recipe = case_arch(case), case_recipe(case)
    names = arch.trainable_names()
    trainable = [f"w/{n}" for n in names]
    buffers = [f"w/{n}" for n in arch.buffer_names()]
    rows = []
    others = [b for b in result["free"] if b != REFERENCE]
    for original, replayer in [pair for other in others for pair in ((REFERENCE, other), (other, REFERENCE))]:
        states, losses = result["free"][original]
        replayed, replay_losses = result["replay"][f"{replayer}_from_{original}"]
        slots = sorted(k for k in states[0] if k.startswith("o/") and k != "o/step")
        for k, (after, loss) in enumerate(zip(replayed, replay_losses)):
            before, want = states[k], states[k + 1]
            lr = lr_at(recipe, k, case["steps"])
            rows.append({
                "case": case["name"], "original": original, "replayed_by": replayer, "step": k, "lr": lr,
                "update_rule_rel": max(update_rule_rel(before, s, recipe, lr, names) for s in (want, after)),
                "grad_rel": _rel(_vector(after, slots) - _vector(want, slots), _vector(want, slots)),
                "loss_rel": abs(loss - losses[k]) / max(abs(losses[k]), 1e-30),
                "bn_rel": (_rel(_vector(after, buffers) - _vector(want, buffers),
                                _vector(want, buffers) - _vector(before, buffers)) if buffers else 0.0),
                "update_rel": _rel(_vector(after, trainable) - _vector(want, trainable),
                                   _vector(want, trainable) - _vector(before, trainable)),
                "step_count_equal": int(after["o/step"]) == int(want["o/step"])})
    return rows


def trajectory_rows(case: dict[str, Any], result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each backend's free run beside torch's: relative weight and loss difference after each step (not a gate)."""
    arch = case_arch(case)
    names = [f"w/{n}" for n in arch.trainable_names()]
    torch_states, torch_losses = result["free"][REFERENCE]
    return [{"case": case["name"], "backend": other, "step": k,
             "weights_rel": _rel(_vector(torch_states[k + 1], names) - _vector(states[k + 1], names),
                                 _vector(states[k + 1], names)),
             "loss_rel": abs(torch_losses[k] - losses[k]) / max(abs(losses[k]), 1e-30)}
            for other, (states, losses) in result["free"].items() if other != REFERENCE
            for k in range(case["steps"])]


def failures(case: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """Human-readable reasons, one per row and criterion that fails (empty when everything passes)."""
    tolerance = {**STEP_TOLERANCE, "grad_rel": case.get("grad_tolerance", STEP_TOLERANCE["grad_rel"])}
    found = []
    for row in rows:
        where = f"{row['case']} step {row['step']} ({row['original']} state, replayed by {row['replayed_by']})"
        found += [f"{where}: {key} {row[key]:.2e} > {limit:.0e}" for key, limit in tolerance.items()
                  if not row[key] <= limit]
        if not row["step_count_equal"]:
            found.append(f"{where}: optimizer step counts differ")
    return found
