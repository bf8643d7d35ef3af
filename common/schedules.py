"""Learning-rate schedules, computed in common per step and fed to both backends.

The backends never run a schedule of their own: the loop passes the learning
rate of every step, so both frameworks see the same float.
"""
from __future__ import annotations

import math

import numpy as np

from common.config import Recipe

ONECYCLE_DIV_FACTOR = 25.0  # one-cycle starts at lr / 25 (torch's default div_factor)


def learning_rates(recipe: Recipe, steps_per_epoch: int) -> np.ndarray:
    """The learning rate of every training step (float64, length epochs * steps_per_epoch)."""
    total = recipe.epochs * steps_per_epoch
    return np.array([lr_at(recipe, step, steps_per_epoch) for step in range(total)])


def lr_at(recipe: Recipe, step: int, steps_per_epoch: int) -> float:
    """Learning rate of global step ``step`` (0-based)."""
    total = recipe.epochs * steps_per_epoch
    peak, final = recipe.lr, recipe.lr * recipe.final_lr_fraction
    if recipe.schedule == "onecycle":
        return _onecycle(recipe, step, total)
    warmup = int(round(recipe.warmup_epochs * steps_per_epoch))
    if step < warmup:  # linear warm-up reaching the peak at the end of warm-up
        return peak * (step + 1) / warmup
    if recipe.schedule == "constant":
        return peak
    if recipe.schedule == "step":
        passed = sum(step >= int(m * total) for m in recipe.step_milestones)
        return peak * recipe.step_gamma ** passed
    progress = (step - warmup) / max(1, total - warmup)  # cosine
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _onecycle(recipe: Recipe, step: int, total: int) -> float:
    start = recipe.lr / ONECYCLE_DIV_FACTOR
    final = recipe.lr * recipe.final_lr_fraction
    rise = max(1, int(recipe.onecycle_pct_start * total))
    if step < rise:
        t = step / rise
        return recipe.lr + (start - recipe.lr) * 0.5 * (1.0 + math.cos(math.pi * t))
    t = (step - rise) / max(1, total - rise)
    return final + (recipe.lr - final) * 0.5 * (1.0 + math.cos(math.pi * t))
