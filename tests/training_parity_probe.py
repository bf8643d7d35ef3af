"""K steps of training on both backends in ONE fresh process; prints per-step differences as JSON.

Run by tests/test_training_parity.py as a subprocess, so the thread pools and
determinism switches are set by this process's own ``setup()`` calls (in a
shared pytest process TensorFlow's pools are fixed by whichever test started
TF first) and the result does not depend on test order.

    python -m tests.training_parity_probe sgd_nesterov_coupled_l2
"""
import json
import sys

import torch  # noqa: F401  (torch before tensorflow: see tests/conftest.py)
import numpy as np

from common.architectures import arch_spec
from common.config import Recipe, RunSpec
from common.data import Dataset
from common.init import initial_weights
from common.registry import get_backend
from common.sampler import epoch_plan
from common.schedules import lr_at

STEPS, HW, BATCH = 10, 8, 32  # see test_k_steps_of_training_match for why so small
RECIPES = {
    "sgd_nesterov_coupled_l2": Recipe(optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=5e-3,
                                      weight_decay_mode="coupled_l2", lr=0.02, schedule="onecycle", epochs=1,
                                      batch_size=BATCH, label_smoothing=0.1),
    "adamw_decoupled": Recipe(optimizer="adamw", weight_decay=0.05, weight_decay_mode="decoupled", lr=1e-3,
                              schedule="onecycle", epochs=1, batch_size=BATCH, adam_epsilon=1e-8),
}


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def learnable_dataset(hw=HW, batch=BATCH, steps=STEPS) -> Dataset:
    """Labels that depend smoothly on the pixels, so training descends instead of memorising noise."""
    rng = np.random.default_rng(0)
    n = batch * steps
    images = rng.integers(0, 256, (n, hw, hw, 3), dtype=np.uint8)
    bright = images.reshape(n, -1).mean(axis=1) > 127.5
    top_heavy = images[:, : hw // 2].mean(axis=(1, 2, 3)) > images[:, hw // 2:].mean(axis=(1, 2, 3))
    labels = (bright + 2 * top_heavy).astype(np.int64)
    return Dataset(spec="test", train_images=images, train_labels=labels, test_images=images[:8],
                   test_labels=labels[:8], class_names=tuple(f"c{i}" for i in range(10)),
                   fingerprint="test", from_cache=False)


def k_step_differences(recipe: Recipe, model: str = "resnet20") -> list[dict]:
    """Per step: relative loss difference, weight-vector difference, and difference of the distance moved."""
    dataset = learnable_dataset()
    weights = initial_weights(arch_spec(model, 10, (HW, HW, 3)), recipe.init_scheme, seed=0)
    sides = {}
    for name in ("torch", "tensorflow"):
        spec = RunSpec(model=model, backend=name, device="cpu", threads=2, deterministic=True, recipe=recipe)
        backend = get_backend(name)
        backend.setup(spec)
        net = backend.build_model(model, 10, (HW, HW, 3), bn_momentum=recipe.bn_momentum, bn_epsilon=recipe.bn_epsilon)
        backend.set_weights(net, weights)
        backend.attach_data(dataset, spec)
        plan = epoch_plan(0, 0, len(dataset.train_labels), BATCH)
        sides[name] = (backend, net, backend.make_train_step(net, spec), list(backend.train_batches(plan)))
    names = sorted(weights)
    initial = np.concatenate([weights[n].ravel() for n in names])
    rows = []
    for k in range(STEPS):
        lr = lr_at(recipe, k, STEPS)
        loss, flat = {}, {}
        for name, (backend, net, step, batches) in sides.items():
            value, _correct = step(*batches[k], lr)
            backend.synchronize()
            loss[name] = float(backend.to_numpy(value))
            current = backend.get_weights(net)
            flat[name] = np.concatenate([current[n].ravel() for n in names])
        rows.append({"step": k, "lr": lr, "loss_rel": rel(loss["torch"], loss["tensorflow"]),
                     "weights_rel": rel(flat["torch"], flat["tensorflow"]),
                     "moved_rel": rel(flat["torch"] - initial, flat["tensorflow"] - initial)})
    final = {n: sides[n][0].get_weights(sides[n][1]) for n in sides}
    rows[-1]["bn_variance_rel"] = rel(final["torch"]["stem.bn.moving_variance"],
                                      final["tensorflow"]["stem.bn.moving_variance"])
    rows[-1]["bn_variance_moved"] = float(np.abs(final["tensorflow"]["stem.bn.moving_variance"] - 1).max())
    return rows


if __name__ == "__main__":
    print(json.dumps(k_step_differences(RECIPES[sys.argv[1]])))
