"""Per-epoch checkpoints in a framework-free format (npz + JSON), written atomically.

A checkpoint holds the canonical weights (including BN statistics), the
optimizer slots, and the loop state (epochs done, global step, per-epoch
rows). The sampler needs no state: an epoch's plan is a pure function of
(seed, epoch), so "epochs done" is the sampler position.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from common.loop import LoopState
from common.results import write_bytes_atomic, write_json_atomic
from common.weights import npz_bytes

WEIGHTS_FILE, OPTIMIZER_FILE, STATE_FILE = "weights.npz", "optimizer.npz", "state.json"


def save_checkpoint(folder: str | Path, weights: dict[str, np.ndarray], optimizer: dict[str, np.ndarray],
                    state: LoopState, run_id: str) -> None:
    """Write the three files; the state file goes last, so it only names complete checkpoints."""
    folder = Path(folder)
    write_bytes_atomic(folder / WEIGHTS_FILE, npz_bytes(weights))
    write_bytes_atomic(folder / OPTIMIZER_FILE, npz_bytes(optimizer))
    write_json_atomic(folder / STATE_FILE, {"run_id": run_id, **asdict(state)})


def load_checkpoint(folder: str | Path, run_id: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], LoopState] | None:
    """(weights, optimizer state, loop state), or None when there is no checkpoint for ``run_id``."""
    folder = Path(folder)
    state_path = folder / STATE_FILE
    if not state_path.exists():
        return None
    raw: dict[str, Any] = json.loads(state_path.read_text())
    if raw.pop("run_id", None) != run_id:
        return None
    with np.load(folder / WEIGHTS_FILE) as w, np.load(folder / OPTIMIZER_FILE) as o:
        weights = {k: w[k] for k in w.files}
        optimizer = {k: o[k] for k in o.files}
    return weights, optimizer, LoopState(**raw)
