"""What one backend contributes to a parity check, and the worker that runs it.

``backend_outputs`` loads given canonical weights into a freshly built model
and reports counts, exported weights, logits and per-layer activations in
eval mode and in training mode (BN batch statistics, dropout off). It is
framework-free: it only talks to the Backend protocol. ``dualbench parity``
runs it in one subprocess per backend (the worker task ``python -m
torch_impl.worker parity REQUEST_DIR OUT_DIR``); tests call it in-process.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

MODES = ("eval", "train")


def backend_outputs(backend: Any, model_name: str, weights: dict[str, np.ndarray], images: np.ndarray,
                    num_classes: int, in_shape: tuple[int, int, int], bn_momentum: float = 0.1,
                    bn_epsilon: float = 1e-5, layers: bool = True) -> dict[str, Any]:
    """Counts, re-exported weights, embeddings (eval mode), logits and (optionally) layer activations
    for both BN modes."""
    model = backend.build_model(model_name, num_classes, in_shape, bn_momentum=bn_momentum,
                                bn_epsilon=bn_epsilon)
    backend.set_weights(model, weights)
    out: dict[str, Any] = {
        "trainable_params": backend.trainable_param_count(model),
        "buffers": backend.buffer_count(model),
        "weights": backend.get_weights(model),
    }
    out["embeddings"] = np.asarray(backend.embed(model, images), np.float32)  # eval mode
    for mode in MODES:
        training = mode == "train"
        out[f"logits_{mode}"] = np.asarray(backend.predict(model, images, training=training), np.float32)
        if layers:
            out[f"layers_{mode}"] = backend.layer_outputs(model, images, training=training)
    # the forward passes must not have changed the weights (training-mode BN updates etc.)
    after = backend.get_weights(model)
    out["weights_unchanged"] = all(np.array_equal(after[k], v) for k, v in out["weights"].items())
    return out


def _save(folder: Path, model_name: str, result: dict[str, Any]) -> None:
    arrays = {f"weights/{k}": v for k, v in result["weights"].items()}
    arrays["embeddings"] = result["embeddings"]
    for mode in MODES:
        arrays[f"logits_{mode}"] = result[f"logits_{mode}"]
        for layer, value in result.get(f"layers_{mode}", {}).items():
            arrays[f"layers_{mode}/{layer}"] = np.asarray(value, np.float32)
    np.savez(folder / f"{model_name}.npz", **arrays)
    meta = {k: result[k] for k in ("trainable_params", "buffers", "weights_unchanged")}
    (folder / f"{model_name}.json").write_text(json.dumps(meta))


def load_outputs(folder: Path, model_name: str) -> dict[str, Any]:
    """Read what ``_save`` wrote back into the ``backend_outputs`` structure."""
    out: dict[str, Any] = json.loads((folder / f"{model_name}.json").read_text())
    out["weights"], out["layers_eval"], out["layers_train"] = {}, {}, {}
    with np.load(folder / f"{model_name}.npz") as data:
        for key in data.files:
            group, _, name = key.partition("/")
            if group == "weights":
                out["weights"][name] = data[key]
            elif group.startswith("layers_"):
                out[group][name] = data[key]
            else:
                out[key] = data[key]
    return out


def run_parity_request(backend_name: str, request: str, out: str) -> int:
    """The ``parity`` worker task: REQUEST holds request.json (models, shapes), <model>.weights.npz, images.npy."""
    from common.config import RunSpec
    from common.registry import get_backend

    request_dir, out_dir = Path(request), Path(out)
    spec = json.loads((request_dir / "request.json").read_text())
    backend = get_backend(backend_name)
    backend.setup(RunSpec(model=spec["models"][0], backend=backend_name, device="cpu", threads=spec.get("threads")))
    images = np.load(request_dir / "images.npy")
    out_dir.mkdir(parents=True, exist_ok=True)
    for model_name in spec["models"]:
        with np.load(request_dir / f"{model_name}.weights.npz") as data:
            weights = {k: data[k] for k in data.files}
        result = backend_outputs(backend, model_name, weights, images, spec["num_classes"],
                                 tuple(spec["in_shape"]), layers=spec.get("layers", True))
        _save(out_dir, model_name, result)
    return 0
