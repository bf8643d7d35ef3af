"""K-step training parity, one step at a time: what one backend does in its worker process.

Both frameworks must make the same update from the same state. Comparing two
free-running trajectories tests chaos as much as semantics: a ReLU input
within fp32 noise of zero can switch sides on one CPU and not on another, and
high-LR SGD amplifies that difference step after step. So the comparison is
made per step (compare.step_parity runs the processes):

1. side A trains K steps on its own ("free run") and records the state before
   every step: canonical weights (BN moving statistics included), optimizer
   slots and step count, and each step's loss;
2. side B loads each of A's states in turn and makes that one step ("replay");
3. each replayed step is compared with A's own step from the same state:
   update, loss, BN statistics and optimizer slots.

Both directions run for every backend against torch (torch replays each
other backend's states and each replays torch's). The free runs are kept too,
as a figure of how far fp32 noise carries, never as a pass/fail gate.
Framework-free: only the Backend protocol.

Data-parallel cases (``case["nproc"]`` > 1) run in every rank of a launch
(compare.launch): each rank trains its shard of the global batch under its
framework's engine and records ITS state (the weights agree across ranks, BN
statistics are replica-local), in ``<case>.rank<r>.*.npz`` for r > 0; a replay
rank r loads the other framework's rank-r states.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from common.architectures import ArchSpec, arch_spec
from common.config import Recipe, RunSpec
from common.data import Dataset
from common.distributed import global_plan, replica_plan
from common.init import initial_weights
from common.schedules import lr_at

SLOTS = {"sgd": ("momentum",), "adam": ("m", "v"), "adamw": ("m", "v")}  # optimizer slot prefixes


def case_recipe(case: dict[str, Any], backend_name: str | None = None) -> Recipe:
    """The Recipe of a case (its dict holds Recipe fields; tuples come back from JSON as lists).

    ``case["overrides"][backend_name]`` replaces fields on that backend only: how the tests
    give one side deliberately wrong semantics and see the comparison fail.
    """
    raw = {**case["recipe"], **case.get("overrides", {}).get(backend_name, {})}
    for key in ("step_milestones", "mean", "std"):
        if key in raw:
            raw[key] = tuple(raw[key])
    return Recipe(**raw)


def case_arch(case: dict[str, Any]) -> ArchSpec:
    return arch_spec(case["model"], 10, (case["hw"], case["hw"], 3))


def learnable_dataset(hw: int, n: int, seed: int = 0) -> Dataset:
    """uint8 images whose labels depend smoothly on the pixels, so the steps descend."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, hw, hw, 3), dtype=np.uint8)
    bright = images.reshape(n, -1).mean(axis=1) > 127.5
    top_heavy = images[:, : hw // 2].mean(axis=(1, 2, 3)) > images[:, hw // 2:].mean(axis=(1, 2, 3))
    labels = (bright + 2 * top_heavy).astype(np.int64)
    return Dataset(spec="step-parity", train_images=images, train_labels=labels, test_images=images[:8],
                   test_labels=labels[:8], class_names=tuple(f"c{i}" for i in range(10)),
                   fingerprint=f"step-parity-{hw}-{n}", from_cache=False)


def full_optimizer_state(state: dict[str, np.ndarray], weights: dict[str, np.ndarray], arch: ArchSpec,
                         recipe: Recipe) -> dict[str, np.ndarray]:
    """``state`` with every slot present: zeros for slots a framework creates lazily (torch before step 1).

    A zero momentum buffer or zero Adam moments at step 0 make the same first
    update as a missing one, so states can cross between frameworks at any step.
    """
    full = {"step": np.asarray(state.get("step", 0), np.int64)}
    slots = SLOTS[recipe.optimizer] if recipe.optimizer != "sgd" or recipe.momentum > 0 else ()
    for slot in slots:
        for name in arch.trainable_names():
            key = f"{slot}/{name}"
            full[key] = np.asarray(state[key], np.float32) if key in state else np.zeros_like(weights[name])
    return full


def case_spec(case: dict[str, Any], backend_name: str) -> RunSpec:
    """The RunSpec a backend runs a case with (``case["nproc"]`` processes, per-replica batch)."""
    return RunSpec(model=case["model"], backend=backend_name, device="cpu", threads=case.get("threads", 2),
                   seed=case.get("seed", 0), deterministic=True, mode=case["modes"][backend_name],
                   nproc=case.get("nproc", 1), collective_timeout_s=case.get("collective_timeout_s", 300.0),
                   recipe=case_recipe(case, backend_name))


def _prepare(backend: Any, case: dict[str, Any]) -> tuple[Any, Any, list, ArchSpec, Recipe]:
    """setup -> model with the case's initial weights -> its K batches (this replica's shard) -> train step."""
    spec, arch = case_spec(case, backend.name), case_arch(case)
    recipe = spec.recipe
    backend.setup(spec)
    model = backend.build_model(case["model"], 10, arch.in_shape, bn_momentum=recipe.bn_momentum,
                                bn_epsilon=recipe.bn_epsilon, dropout=recipe.dropout)
    backend.set_weights(model, initial_weights(arch, recipe.init_scheme, case.get("seed", 0)))
    dataset = learnable_dataset(case["hw"], recipe.batch_size * spec.world_size * case["steps"])
    backend.attach_data(dataset, spec)
    plan = replica_plan(global_plan(spec, 0, len(dataset.train_labels)), backend.replica())
    batches = list(backend.train_batches(plan))
    return model, backend.make_train_step(model, spec), batches, arch, recipe


def _state(backend: Any, model: Any, step: Any, arch: ArchSpec, recipe: Recipe) -> dict[str, np.ndarray]:
    weights = backend.get_weights(model)
    optimizer = full_optimizer_state(step.optimizer_state(), weights, arch, recipe)
    return {**{f"w/{k}": v for k, v in weights.items()}, **{f"o/{k}": v for k, v in optimizer.items()}}


def _load(backend: Any, model: Any, step: Any, state: dict[str, np.ndarray]) -> None:
    backend.set_weights(model, {k[2:]: v for k, v in state.items() if k.startswith("w/")})
    step.load_optimizer_state({k[2:]: v for k, v in state.items() if k.startswith("o/")})


def _one_step(backend: Any, step: Any, batch: tuple, lr: float) -> float:
    loss, _correct = step(*batch, lr)
    backend.synchronize()
    return float(backend.to_numpy(loss))


def free_run(backend: Any, case: dict[str, Any], prepared: tuple | None = None
             ) -> tuple[list[dict[str, np.ndarray]], list[float]]:
    """K steps on this backend alone: the states before steps 0..K (K+1 of them) and the K losses.
    ``prepared``: ``_prepare``'s model, step and batches to use (default: built here)."""
    model, step, batches, arch, recipe = prepared or _prepare(backend, case)
    states, losses = [_state(backend, model, step, arch, recipe)], []
    for k in range(case["steps"]):
        losses.append(_one_step(backend, step, batches[k], lr_at(recipe, k, case["steps"])))
        states.append(_state(backend, model, step, arch, recipe))
    return states, losses


def replay(backend: Any, case: dict[str, Any], states: list[dict[str, np.ndarray]], prepared: tuple | None = None
           ) -> tuple[list[dict[str, np.ndarray]], list[float]]:
    """Step k made from ``states[k]`` (another backend's), for every k: (states after, losses). Every step
    loads its whole state first (weights, BN statistics, optimizer slots and step count), so the model and
    step of this backend's free run (``prepared``) serve: no second build, trace or compile."""
    model, step, batches, arch, recipe = prepared or _prepare(backend, case)
    after, losses = [], []
    for k in range(case["steps"]):
        _load(backend, model, step, states[k])
        losses.append(_one_step(backend, step, batches[k], lr_at(recipe, k, case["steps"])))
        after.append(_state(backend, model, step, arch, recipe))
    return after, losses


def save_states(path: Path, states: list[dict[str, np.ndarray]], losses: list[float]) -> None:
    arrays = {f"{k}|{key}": value for k, state in enumerate(states) for key, value in state.items()}
    np.savez(path, **arrays)
    path.with_suffix(".json").write_text(json.dumps({"losses": losses, "count": len(states)}))


def load_states(path: Path) -> tuple[list[dict[str, np.ndarray]], list[float]]:
    meta = json.loads(path.with_suffix(".json").read_text())
    states: list[dict[str, np.ndarray]] = [{} for _ in range(meta["count"])]
    with np.load(path) as data:
        for key in data.files:
            index, _, name = key.partition("|")
            states[int(index)][name] = data[key]
    return states, meta["losses"]


def run_step_parity_request(backend_name: str, request: str, out: str) -> int:
    """The ``step-parity`` worker task.

    REQUEST/request.json: ``{"cases": [...], "free_run": bool, "replays": [{"source": backend,
    "states": folder}, ...]}``. Only the cases that give this backend a mode (``case["modes"]``) run;
    a case with ``"replay": false`` gets its free run only.
    Writes OUT/<case>.free.npz (this backend's free run, unless ``free_run`` is false) and, per
    replay, OUT/<case>.replay_<source>.npz: the steps made from ``source``'s free-run states, read
    from <states>/<case>.free.npz (rank r > 0 of a data-parallel case: ``state_file``'s names).
    """
    from common.registry import get_backend

    request_dir, out_dir = Path(request), Path(out)
    spec = json.loads((request_dir / "request.json").read_text())
    backend = get_backend(backend_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = [case for case in spec["cases"] if backend_name in case["modes"]]
    if cases:
        backend.setup(case_spec(cases[0], backend_name))  # joins the engine: this process's rank
    rank = backend.replica().rank
    for case in cases:
        prepared = _prepare(backend, case)
        if spec.get("free_run", True):
            states, losses = free_run(backend, case, prepared)
            save_states(out_dir / state_file(case["name"], rank, "free"), states, losses)
        if not case.get("replay", True):
            continue
        for replay_request in spec.get("replays", []):
            source = Path(replay_request["states"]) / state_file(case["name"], rank, "free")
            if source.exists():  # the source backend ran this case
                states, _ = load_states(source)
                save_states(out_dir / state_file(case["name"], rank, f"replay_{replay_request['source']}"),
                            *replay(backend, case, states, prepared))
    backend.finish()
    return 0


def state_file(case_name: str, rank: int, kind: str) -> str:
    """``<case>.<kind>.npz`` (rank 0 and single processes), ``<case>.rank<r>.<kind>.npz`` for rank r > 0."""
    return f"{case_name}.{kind}.npz" if rank == 0 else f"{case_name}.rank{rank}.{kind}.npz"
