"""Checks that need Keras on PyTorch, in a process of their own: ``python -m tests.kerastorch_checks OUT.json``.

Keras chooses its backend once per process and the test process runs Keras on
TensorFlow, so tests/test_kerastorch.py starts this module once and asserts on
the numbers it writes (raw measurements, never pass/fail verdicts):

* ``optimizer``: keras_impl's optimizer on torch tensors, 5 steps with a changing LR and real
  gradients, against common.optim_reference, against Keras's own semantics and the other decay mode;
* ``fit``: Keras's fit against the custom step after K steps on the same batches, and a fit whose
  LR is not set per step;
* ``bn``: torch's fused BatchNorm kernel against the composed keras.ops one, and the composed
  two-pass variance against keras.ops.moments's one-pass one on data with |mean| >> std;
* ``embed``: every model on 28x28x1 input (MNIST-shaped): the embedding's shape, and the classifier
  head applied to it against the model's logits;
* ``tensorflow_loaded``: whether anything pulled TensorFlow into the process.
"""
from __future__ import annotations

import dataclasses
import json
import sys

import kerastorch_impl  # noqa: F401  (first: KERAS_BACKEND=torch)
import numpy as np
import torch
from keras import ops

from common.init import initial_weights
from common.optim_reference import ReferenceOptimizer
from common.registry import get_backend
from keras_impl.layers import composed_batch_norm
from kerastorch_impl import weights as kt_weights
from kerastorch_impl.layers import BatchNorm, _fused_batch_norm
from kerastorch_impl.models import create_model
from kerastorch_impl.optim import TrainStep, softmax_cross_entropy
from tests import fit_checks
from tests.optim_cases import LR_FACTORS, RECIPES, keras_semantics, rel_diff, replay

IN_SHAPE = (12, 12, 3)


def _model(name: str = "resnet20"):
    model = create_model(name, 10, IN_SHAPE)
    kt_weights.set_weights(model, model.arch_spec, initial_weights(model.arch_spec, "torch_default", 0))
    return model


def _trainable(model) -> dict[str, np.ndarray]:
    weights = kt_weights.get_weights(model, model.arch_spec)
    return {n: weights[n] for n in model.arch_spec.trainable_names()}


def _gradients(model) -> dict[str, np.ndarray]:
    """Canonical-name gradients at the current weights (batch statistics, model left unchanged)."""
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.standard_normal((8, *IN_SHAPE)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, 10, 8))
    names = kt_weights.trainable_variable_names(model, model.arch_spec)
    with kt_weights.inference(model, training=True):
        loss = softmax_cross_entropy(model(images, training=True), labels, 10)
    grads = torch.autograd.grad(loss, [v.value for v in model.trainable_variables])
    return {n: g.numpy() for n, g in zip(names, grads)}


def optimizer(recipe_name: str) -> dict[str, float]:
    """Relative distance of 5 updates from the reference, Keras's semantics and the other decay mode."""
    recipe = RECIPES[recipe_name]
    model = _model()
    start, grads = _trainable(model), _gradients(model)
    step = TrainStep(model, model.arch_spec, recipe, device="cpu", mode="eager")
    lrs = [recipe.lr * f for f in LR_FACTORS]
    for lr in lrs:
        step.inner_optimizer.learning_rate = lr
        with torch.no_grad():
            step.optimizer.apply([torch.from_numpy(grads[n]) for n in step.variable_names], step.variables)
    got = _trainable(model)
    want = replay(ReferenceOptimizer(recipe), dict(start), grads, lrs)
    other_mode = "coupled_l2" if recipe.weight_decay_mode == "decoupled" else "decoupled"
    wrong_decay = replay(ReferenceOptimizer(dataclasses.replace(
        recipe, weight_decay_mode=other_mode, decay_bn_and_bias=not recipe.decay_bn_and_bias)), dict(start), grads, lrs)
    out = {"reference": max(rel_diff(got[n], want[n]) for n in got),
           "wrong_decay": max(rel_diff(got[n], wrong_decay[n]) for n in got),
           "steps": int(step.optimizer_state()["step"])}
    if recipe.optimizer != "sgd" or recipe.momentum > 0:
        keras_own = keras_semantics(recipe, start, grads, lrs)
        out["keras_semantics"] = max(rel_diff(got[n], keras_own[n]) for n in got)
    return out


def fit() -> dict[str, float | str]:
    """fit vs custom after K steps (and a fit without per-step LRs vs custom), worst relative difference."""
    backend = get_backend("keras-torch")
    same = fit_checks.fit_and_custom(backend)
    wrong = fit_checks.fit_and_custom(backend, wrong_lrs=True)
    worst, where = fit_checks.worst_relative_difference(same["fit"], same["custom"])
    wrong_worst, _ = fit_checks.worst_relative_difference(wrong["fit"], wrong["custom"])
    moved, _ = fit_checks.worst_relative_difference(same["custom"], {k: v for k, v in wrong["custom"].items()})
    return {"fit_vs_custom": worst, "where": where, "wrong_lrs_vs_custom": wrong_worst,
            "same_custom_twice": moved, "steps": int(same["fit"]["o/step"])}


def bn() -> dict[str, float]:
    """Fused vs composed kernel outputs and statistics; two-pass vs one-pass variance when |mean| >> std."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((16, 6, 6, 8)).astype(np.float32) * 2 + 0.5)
    gamma, beta = (torch.from_numpy(rng.uniform(0.5, 1.5, 8).astype(np.float32)) for _ in range(2))
    fused = _fused_batch_norm(x, gamma, beta, 1e-5)
    composed = composed_batch_norm(x, gamma, beta, 1e-5)
    offset = torch.from_numpy(rng.standard_normal((16, 6, 6, 8)).astype(np.float32) * 1e-2 + 300.0)
    exact = np.asarray(offset.numpy(), np.float64).var(axis=(0, 1, 2))
    two_pass = composed_batch_norm(offset, gamma, beta, 1e-5)[2].numpy() * (576 - 1) / 576
    one_pass = ops.convert_to_numpy(ops.moments(offset, axes=(0, 1, 2))[1])
    return {"outputs": rel_diff(fused[0].numpy(), composed[0].numpy()),
            "mean": rel_diff(fused[1].numpy(), composed[1].numpy()),
            "unbiased_variance": rel_diff(fused[2].numpy(), composed[2].numpy()),
            "two_pass_variance_error": rel_diff(two_pass, exact), "one_pass_variance_error": rel_diff(one_pass, exact),
            "default_implementation": BatchNorm.implementation}


def embed() -> dict[str, dict[str, float | list[int]]]:
    """Per model at 28x28x1: embedding shape vs the spec's, and |head(embedding) - logits| / max|logits|."""
    from common.architectures import EMBEDDING_LAYER
    from common.registry import list_models

    backend = get_backend("keras-torch")
    images = np.random.default_rng(2).standard_normal((4, 28, 28, 1)).astype(np.float32)
    out = {}
    for name in list_models():
        model = backend.build_model(name, 10, (28, 28, 1))
        weights = initial_weights(model.arch_spec, "torch_default", 2)
        backend.set_weights(model, weights)
        features = backend.embed(model, images)
        head = features @ weights[f"{EMBEDDING_LAYER}.kernel"] + weights[f"{EMBEDDING_LAYER}.bias"]
        logits = backend.predict(model, images)
        out[name] = {"shape": list(features.shape), "expected_shape": [4, model.arch_spec.embedding_dim()],
                     "dtype": str(features.dtype), "head_vs_logits": rel_diff(head, logits)}
    return out


def main(out_path: str) -> int:
    results = {"optimizer": {name: optimizer(name) for name in RECIPES}, "fit": fit(), "bn": bn(), "embed": embed()}
    results["tensorflow_loaded"] = any(m == "tensorflow" or m.startswith("tensorflow.") for m in sys.modules)
    with open(out_path, "w") as handle:
        json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
