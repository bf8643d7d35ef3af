"""Keras's fit against the custom step on one Keras backend, through the Backend protocol only.

Used in-process for TensorFlow (tests/test_keras_fit.py) and in a keras-torch process
(tests/kerastorch_checks.py): the same model, initial weights, batches and per-step learning
rates, K steps each way, then every weight, BN statistic and optimizer slot side by side.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from common.config import Recipe, RunSpec
from common.init import initial_weights
from common.sampler import epoch_plan
from common.schedules import lr_at
from common.step_parity import learnable_dataset

STEPS = 5  # K steps of each style
# one-cycle over the K steps: the LR changes every step, so a fit whose LR were not set per step shows
RECIPE = Recipe(optimizer="sgd", lr=0.02, momentum=0.9, nesterov=True, weight_decay=5e-3, schedule="onecycle",
                epochs=1, batch_size=16, label_smoothing=0.1)


def _trained(backend, spec: RunSpec, dataset, lrs: list[float] | None) -> dict[str, np.ndarray]:
    """Weights (BN statistics included) and optimizer slots after STEPS steps of ``spec.style``.

    ``lrs`` replaces the schedule's per-step learning rates (fit only; a deliberately wrong run).
    """
    arch_model = backend.build_model(spec.model, 10, dataset.in_shape, bn_momentum=spec.recipe.bn_momentum,
                                     bn_epsilon=spec.recipe.bn_epsilon)
    backend.set_weights(arch_model, initial_weights(arch_model.arch_spec, spec.recipe.init_scheme, 0))
    backend.attach_data(dataset, spec)
    step = backend.make_train_step(arch_model, spec)
    plan = epoch_plan(0, 0, len(dataset.train_labels), spec.recipe.batch_size)
    schedule = [lr_at(spec.recipe, k, STEPS) for k in range(STEPS)]
    if spec.style == "fit":
        step.fit_epoch(plan, lrs or schedule, lambda *_: False)
    else:
        for (images, labels), lr in zip(backend.train_batches(plan), schedule):
            step(images, labels, lr)
    backend.synchronize()
    state = {f"o/{k}": v for k, v in step.optimizer_state().items()}
    return {**{f"w/{k}": v for k, v in backend.get_weights(arch_model).items()}, **state}


def fit_and_custom(backend, model: str = "resnet20", mode: str = "eager", hw: int = 8,
                   wrong_lrs: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """{"custom": state, "fit": state} after STEPS steps from the same start on the same batches.

    ``wrong_lrs``: fit runs at the recipe's peak LR every step instead of the schedule's (a broken fit).
    """
    dataset = learnable_dataset(hw, RECIPE.batch_size * STEPS)
    spec = RunSpec(model=model, backend=backend.name, device="cpu", threads=2, deterministic=True, mode=mode,
                   recipe=RECIPE)
    backend.setup(spec)
    custom = _trained(backend, spec, dataset, None)
    fit = _trained(backend, dataclasses.replace(spec, style="fit"), dataset, [RECIPE.lr] * STEPS if wrong_lrs else None)
    return {"custom": custom, "fit": fit}


def worst_relative_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[float, str]:
    """max over arrays of |a - b| / max(|b|, 1e-6 scale), and the array where it is."""
    worst, where = 0.0, ""
    for key in sorted(b):
        x, y = np.asarray(a[key], np.float64), np.asarray(b[key], np.float64)
        rel = float(np.abs(x - y).max() / max(float(np.abs(y).max()), 1e-6)) if y.size else 0.0
        if rel > worst:
            worst, where = rel, key
    return worst, where
