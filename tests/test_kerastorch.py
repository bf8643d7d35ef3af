"""The Keras-on-PyTorch backend (keras-torch): the shared Keras code on torch tensors.

Keras picks its backend once per process and this test process runs Keras on
TensorFlow, so the checks run once in a keras-torch process
(tests/kerastorch_checks.py) and the tests below judge its numbers. Each
property comes with what a broken variant measures (Keras's own optimizer
semantics, the other decay mode, a fit without per-step LRs, the one-pass
variance), so a check that cannot fail would show here.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.optim_cases import RECIPES
from tests.runner_helpers import PROJECT_ROOT

FIT_RTOL = 1e-5  # fit and the custom step run the same float32 computation; their difference is rounding


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("keras") is None:
        pytest.skip("torch and keras are needed for the keras-torch backend")
    out = tmp_path_factory.mktemp("kerastorch") / "checks.json"
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    done = subprocess.run([sys.executable, "-m", "tests.kerastorch_checks", str(out)], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("recipe_name", list(RECIPES))
def test_optimizer_on_torch_tensors_follows_the_reference_with_a_changing_lr(checks, recipe_name):
    found = checks["optimizer"][recipe_name]
    assert found["steps"] == 5
    assert found["reference"] <= 2e-6, found
    assert found["wrong_decay"] > 100 * 2e-6, found  # the other decay mode ends far away
    if "keras_semantics" in found:  # plain SGD has no momentum/epsilon to misplace
        assert found["keras_semantics"] > 100 * 2e-6, found  # Keras's own SGD/Adam would too


def test_fit_and_the_custom_step_reach_the_same_parameters(checks):
    """K steps of model.fit and of the custom step from the same start on the same batches: every weight,
    BN statistic and optimizer slot agrees to float32 rounding; a fit whose LR is not set per step from
    the schedule does not."""
    found = checks["fit"]
    assert found["steps"] == 5
    assert found["same_custom_twice"] == 0.0  # the runs are deterministic: any difference is the style's
    assert found["fit_vs_custom"] <= FIT_RTOL, found
    assert found["wrong_lrs_vs_custom"] > 100 * FIT_RTOL, found


def test_torch_fused_batch_norm_kernel_matches_the_composed_one(checks):
    found = checks["bn"]
    assert found["default_implementation"] == "fused"
    for key in ("outputs", "mean", "unbiased_variance"):
        assert found[key] <= 1e-5, (key, found)


def test_composed_variance_is_two_pass_where_keras_moments_cancels(checks):
    """keras.ops.moments on torch computes E[x^2] - E[x]^2: with |mean| = 300 and std 0.01 it is off by
    orders of magnitude, the composed kernel's two-pass variance is not."""
    found = checks["bn"]
    assert found["two_pass_variance_error"] < 1e-2, found
    assert found["one_pass_variance_error"] > 10 * max(found["two_pass_variance_error"], 1e-3), found


def test_embedding_is_the_classifier_input_on_grayscale_input(checks):
    """embed() (what retrieval ranks) returns the penultimate features on 28x28x1 input for every model:
    the classifier head applied to them gives the model's logits."""
    for model, found in checks["embed"].items():
        assert found["shape"] == found["expected_shape"] and found["dtype"] == "float32", (model, found)
        assert found["head_vs_logits"] <= 1e-4, (model, found)


def test_a_keras_torch_process_never_loads_tensorflow(checks):
    assert checks["tensorflow_loaded"] is False
