"""Framework-free pieces of the optimizer tests, shared by the in-process TensorFlow tests
(tests/test_tf_optim.py) and the Keras-on-PyTorch checks that run in their own process
(tests/kerastorch_checks.py): recipes, changing learning rates, and what Keras's own optimizers
would do with the same gradients (the wrong semantics every test must tell apart)."""
import numpy as np

from common.config import Recipe
from common.optim_reference import decays

LR_FACTORS = [1.0, 0.5, 2.0, 0.1, 0.7]  # per-step multipliers of the recipe's peak LR (a changing LR)
RECIPES = {
    "sgd_nesterov_coupled": Recipe(optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=5e-3),
    "sgd_momentum_decoupled_kernels_only": Recipe(optimizer="sgd", momentum=0.8, nesterov=False,
                                                  weight_decay=1e-2, weight_decay_mode="decoupled",
                                                  decay_bn_and_bias=False),
    "sgd_plain": Recipe(optimizer="sgd", momentum=0.0, nesterov=False, weight_decay=1e-3),
    "adam_coupled": Recipe(optimizer="adam", weight_decay=1e-3, adam_epsilon=1e-6, lr=1e-3),
    "adamw_decoupled_kernels_only": Recipe(optimizer="adamw", weight_decay=5e-2, adam_beta2=0.99,
                                           weight_decay_mode="decoupled", decay_bn_and_bias=False, lr=1e-3),
}


def keras_semantics(recipe, params, grads, lrs):
    """What Keras's own SGD / Adam would do with the same gradients: the LR folded into the momentum
    buffer (v = m*v - lr*g), or epsilon added before Adam's bias correction. Decay as the reference."""
    params = {n: np.asarray(w, np.float64).copy() for n, w in params.items()}
    slots = {n: [np.zeros_like(w), np.zeros_like(w)] for n, w in params.items()}
    for t, lr in enumerate(lrs, start=1):
        for name, w in params.items():
            g = np.asarray(grads[name], np.float64)
            if decays(name, recipe):
                if recipe.weight_decay_mode == "coupled_l2":
                    g = g + recipe.weight_decay * w
                else:
                    w = w * (1.0 - lr * recipe.weight_decay)
            if recipe.optimizer == "sgd":
                v = slots[name][0] = recipe.momentum * slots[name][0] - lr * g
                w = w + (recipe.momentum * v - lr * g if recipe.nesterov else v)
            else:
                m = slots[name][0] = recipe.adam_beta1 * slots[name][0] + (1 - recipe.adam_beta1) * g
                v = slots[name][1] = recipe.adam_beta2 * slots[name][1] + (1 - recipe.adam_beta2) * g * g
                lr_t = lr * np.sqrt(1 - recipe.adam_beta2 ** t) / (1 - recipe.adam_beta1 ** t)
                w = w - lr_t * m / (np.sqrt(v) + recipe.adam_epsilon)
            params[name] = w
    return params


def replay(reference, params, grads, lrs):
    """``reference`` (a ReferenceOptimizer) stepped with the same gradients at each LR."""
    for lr in lrs:
        params = reference.step(params, grads, lr)
    return params


def rel_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
