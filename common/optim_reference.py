"""The optimizer semantics of a Recipe, written once in numpy.

Both backends must produce exactly these updates (tests compare each against
this reference, and against each other after K steps). Torch conventions are
the definition, because Keras's built-ins differ in two places:

* SGD momentum: torch keeps ``buf = m*buf + g`` and applies ``lr * buf``;
  Keras folds the LR into the buffer (``v = m*v - lr*g``), which diverges from
  torch as soon as the learning rate changes between steps.
* Adam epsilon: torch adds eps to ``sqrt(v)/sqrt(1-b2^t)``; Keras adds it to
  ``sqrt(v)`` before the bias correction, i.e. an effective eps that changes
  with t.

Weight decay: ``coupled_l2`` adds ``wd * w`` to the gradient (torch SGD/Adam
``weight_decay``); ``decoupled`` multiplies ``w`` by ``1 - lr * wd`` before the
update (torch AdamW; Keras ``weight_decay``). With ``decay_bn_and_bias=False``
only conv/dense kernels decay.
"""
from __future__ import annotations

import numpy as np

from common.config import Recipe


def decays(name: str, recipe: Recipe) -> bool:
    """Whether the canonical parameter ``name`` gets weight decay under ``recipe``."""
    return recipe.weight_decay > 0 and (recipe.decay_bn_and_bias or name.endswith(".kernel"))


class ReferenceOptimizer:
    """Numpy optimizer over canonical float64 parameters, one ``step`` per training step."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.t = 0  # steps taken
        self.slots: dict[str, dict[str, np.ndarray]] = {}

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray], lr: float) -> dict[str, np.ndarray]:
        """Return updated copies of ``params`` after one step with learning rate ``lr``."""
        r = self.recipe
        self.t += 1
        updated = {}
        for name, w in params.items():
            w = np.asarray(w, np.float64).copy()
            g = np.asarray(grads[name], np.float64).copy()
            if decays(name, r):
                if r.weight_decay_mode == "coupled_l2":
                    g = g + r.weight_decay * w
                else:
                    w = w * (1.0 - lr * r.weight_decay)
            slot = self.slots.setdefault(name, {})
            updated[name] = self._sgd(w, g, lr, slot) if r.optimizer == "sgd" else self._adam(w, g, lr, slot)
        return updated

    def _sgd(self, w, g, lr, slot):
        r = self.recipe
        if r.momentum == 0:
            return w - lr * g
        buf = slot.get("momentum")
        buf = g.copy() if buf is None else r.momentum * buf + g
        slot["momentum"] = buf
        direction = g + r.momentum * buf if r.nesterov else buf
        return w - lr * direction

    def _adam(self, w, g, lr, slot):
        r = self.recipe
        m = r.adam_beta1 * slot.get("m", 0.0) + (1 - r.adam_beta1) * g
        v = r.adam_beta2 * slot.get("v", 0.0) + (1 - r.adam_beta2) * g * g
        slot["m"], slot["v"] = m, v
        bc1 = 1 - r.adam_beta1 ** self.t
        bc2 = 1 - r.adam_beta2 ** self.t
        return w - (lr / bc1) * m / (np.sqrt(v) / np.sqrt(bc2) + r.adam_epsilon)
