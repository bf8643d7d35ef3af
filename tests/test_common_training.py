"""Sampler, schedules, optimizer reference, metrics, results store, audit."""
import json
import math
import os

import numpy as np
import pytest

from common import results
from common.audit import AUDIT_KEYS, MUST_MATCH, asymmetries, compare_settings, decay_settings, single_value
from common.config import Recipe
from common.metrics import (classification_report, confusion_matrix, cross_entropy, median_ci,
                            per_class_scores)
from common.optim_reference import ReferenceOptimizer
from common.sampler import augment_reference, epoch_plan, normalize_reference, plan_batch_reference
from common.schedules import learning_rates, lr_at


def test_sampler_is_a_pure_function_of_its_inputs():
    a = epoch_plan(7, 3, 1000, 64)
    b = epoch_plan(7, 3, 1000, 64)
    assert np.array_equal(a.order, b.order) and np.array_equal(a.crop_offsets, b.crop_offsets)
    assert np.array_equal(a.flips, b.flips)
    c = epoch_plan(7, 4, 1000, 64)
    d = epoch_plan(8, 3, 1000, 64)
    assert not np.array_equal(a.order, c.order) and not np.array_equal(a.order, d.order)


@pytest.mark.parametrize("drop_last", [True, False])
def test_each_index_once_per_epoch_and_batching(drop_last):
    plan = epoch_plan(0, 0, 1003, 100, drop_last=drop_last, crop_padding=4)
    assert sorted(plan.order.tolist()) == list(range(1003))
    sizes = plan.batch_sizes()
    assert sizes == ([100] * 10 if drop_last else [100] * 10 + [3])
    assert plan.crop_offsets.min() >= 0 and plan.crop_offsets.max() <= 8
    assert set(np.unique(plan.crop_offsets)) == set(range(9))  # every offset in range is used
    assert 0.4 < plan.flips.mean() < 0.6


def test_no_augmentation_means_centred_crops_and_no_flips():
    plan = epoch_plan(0, 0, 50, 10, augment=False, crop_padding=4)
    images = np.random.default_rng(0).integers(0, 255, (50, 8, 8, 3), dtype=np.uint8)
    batch = plan_batch_reference(images, plan, 0)
    assert np.array_equal(batch, images[plan.order[:10]])


def test_augment_reference_crops_and_flips():
    img = np.arange(4 * 4, dtype=np.uint8).reshape(1, 4, 4, 1)
    out = augment_reference(img, np.array([[0, 0]]), np.array([False]), pad=1)
    # top-left crop of the 1-padded image: first row and column are padding zeros
    assert out[0, 0, :, 0].tolist() == [0, 0, 0, 0]
    assert out[0, 1, :, 0].tolist() == [0, 0, 1, 2]
    flipped = augment_reference(img, np.array([[1, 1]]), np.array([True]), pad=1)
    assert np.array_equal(flipped[0, :, :, 0], img[0, :, ::-1, 0])


def test_normalize_reference():
    x = np.full((1, 1, 1, 3), 255, np.uint8)
    out = normalize_reference(x, (0.5, 0.5, 0.5), (0.5, 0.25, 1.0))
    assert out.dtype == np.float32 and np.allclose(out.ravel(), [1.0, 2.0, 0.5])


def test_schedules():
    cos = Recipe(epochs=2, lr=0.1, schedule="cosine")
    lrs = learning_rates(cos, 10)
    assert len(lrs) == 20 and lrs[0] == pytest.approx(0.1) and lrs[-1] < 0.002
    assert np.all(np.diff(lrs) <= 1e-12)
    warm = Recipe(epochs=4, lr=0.1, schedule="cosine", warmup_epochs=1)
    assert lr_at(warm, 0, 10) == pytest.approx(0.01) and lr_at(warm, 9, 10) == pytest.approx(0.1)
    step = Recipe(epochs=4, lr=1.0, schedule="step", step_milestones=(0.5, 0.75), step_gamma=0.1)
    assert [lr_at(step, s, 10) for s in (0, 19, 20, 29, 30)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    one = Recipe(epochs=4, lr=1.0, schedule="onecycle", onecycle_pct_start=0.25)
    lrs = learning_rates(one, 10)
    assert lrs[0] == pytest.approx(1 / 25) and lrs.max() == pytest.approx(1.0) and np.argmax(lrs) == 10
    assert learning_rates(Recipe(epochs=1, schedule="constant", lr=0.3), 5).tolist() == [0.3] * 5


def test_reference_sgd_matches_hand_computation_with_changing_lr():
    r = Recipe(optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=0.1)
    opt = ReferenceOptimizer(r)
    w = {"a.kernel": np.array([1.0])}
    g = {"a.kernel": np.array([0.5])}
    w1 = opt.step(w, g, lr=0.1)  # g' = 0.5 + 0.1 = 0.6; buf = 0.6; d = 0.6 + 0.54 = 1.14
    assert w1["a.kernel"][0] == pytest.approx(1 - 0.1 * 1.14)
    w2 = opt.step(w1, g, lr=0.01)  # g' = 0.5 + 0.1*0.886; buf = 0.9*0.6 + g'; d = g' + 0.9*buf
    gp = 0.5 + 0.1 * 0.886
    buf = 0.9 * 0.6 + gp
    assert w2["a.kernel"][0] == pytest.approx(0.886 - 0.01 * (gp + 0.9 * buf))


def test_reference_adamw_matches_hand_computation():
    r = Recipe(optimizer="adamw", weight_decay_mode="decoupled", weight_decay=0.01, adam_epsilon=1e-8)
    opt = ReferenceOptimizer(r)
    w1 = opt.step({"b.bias": np.array([2.0])}, {"b.bias": np.array([0.3])}, lr=0.1)
    # decay: 2*(1-0.001); first Adam step moves by lr * m_hat/(sqrt(v_hat)+eps) = 0.1 * sign(g)
    assert w1["b.bias"][0] == pytest.approx(2 * (1 - 0.001) - 0.1, abs=1e-7)
    no_bn = ReferenceOptimizer(Recipe(optimizer="sgd", momentum=0.0, weight_decay=1.0, decay_bn_and_bias=False))
    out = no_bn.step({"x.bias": np.array([1.0]), "x.kernel": np.array([1.0])},
                     {"x.bias": np.array([0.0]), "x.kernel": np.array([0.0])}, lr=0.5)
    assert out["x.bias"][0] == 1.0 and out["x.kernel"][0] == 0.5


def test_metrics_against_hand_computed_values():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    labels = np.array([0, 1, 1])
    expected = np.mean([math.log(1 + math.exp(-2)), math.log(1 + math.exp(-1)), math.log(1 + math.exp(3))])
    assert cross_entropy(logits, labels) == pytest.approx(expected)
    m = confusion_matrix(np.array([0, 1, 0]), labels, 2)
    assert m.tolist() == [[1, 0], [1, 1]]
    scores = per_class_scores(m)
    assert scores["precision"] == pytest.approx([0.5, 1.0]) and scores["recall"] == pytest.approx([1.0, 0.5])
    assert scores["f1"] == pytest.approx([2 / 3, 2 / 3])
    report = classification_report(logits, labels, 2)
    assert report["accuracy"] == pytest.approx(2 / 3)
    smooth = cross_entropy(np.zeros((1, 4)), np.array([0]), label_smoothing=0.1)
    assert smooth == pytest.approx(math.log(4))


def test_median_ci_brackets_the_median():
    rng = np.random.default_rng(0)
    values = rng.lognormal(size=201)
    median, lo, hi = median_ci(values)
    assert lo < median < hi and median == pytest.approx(np.median(values))
    assert median_ci([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)


def test_atomic_writers_leave_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "runs.jsonl"
    results.upsert_jsonl_atomic(path, {"run_id": "a", "x": 1})
    results.upsert_jsonl_atomic(path, {"run_id": "b", "x": float("nan")})
    results.upsert_jsonl_atomic(path, {"run_id": "a", "x": 2})
    rows = results.read_jsonl(path)
    assert [(r["run_id"], r["x"]) for r in rows] == [("b", None), ("a", 2)]
    before = path.read_bytes()

    def broken_replace(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        results.upsert_jsonl_atomic(path, {"run_id": "c"})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["runs.jsonl"]  # no temp file left behind


def test_run_result_round_trip_ignores_unknown_keys(tmp_path):
    r = results.RunResult(run_id="m__torch__seed0", model="m", backend="torch", seed=0, test_accuracy=0.5)
    raw = json.loads(json.dumps(r.to_dict()))
    raw["from_the_future"] = 1
    back = results.RunResult.from_dict(raw)
    assert back == r and back.schema_version == results.SCHEMA_VERSION


def test_audit_flags_asymmetries_only_for_must_match_keys():
    base = {k: 1 for k in AUDIT_KEYS}
    tf = dict(base, data_format="NHWC", bn_momentum=0.01)
    rows = compare_settings({"torch": dict(base, data_format="NCHW"), "tensorflow": tf})
    flagged = [r["setting"] for r in asymmetries(rows)]
    assert flagged == ["bn_momentum"]
    missing = dict(base)
    del missing["optimizer_epsilon"]
    rows = compare_settings({"torch": base, "tensorflow": missing})
    assert [r["setting"] for r in asymmetries(rows)] == ["optimizer_epsilon"]
    assert "bn_momentum" in MUST_MATCH


def test_a_value_mixed_across_layers_is_an_asymmetry_even_when_both_sides_are_mixed_alike():
    mixed = single_value([1e-5, 1e-3, 1e-5])
    assert mixed.startswith("mixed ") and single_value([0.1, 0.1]) == 0.1 and single_value([]) is None
    base = {k: 1 for k in AUDIT_KEYS}
    rows = compare_settings({"torch": dict(base, bn_epsilon=mixed), "tensorflow": dict(base, bn_epsilon=mixed)})
    assert [r["setting"] for r in asymmetries(rows)] == ["bn_epsilon"]


def test_decay_settings_read_which_parameters_decay_from_the_names():
    trainable = ["conv.kernel", "bn.gamma", "bn.beta", "head.kernel", "head.bias"]
    kernels = decay_settings(["head.kernel", "conv.kernel"], trainable)
    assert kernels["decayed_param_count"] == 2 and kernels["decay_bn_and_bias"] is False
    assert kernels["decayed_param_names"] == ["conv.kernel", "head.kernel"]  # sorted
    assert kernels["decayed_param_digest"] == decay_settings(["conv.kernel", "head.kernel"], trainable)[
        "decayed_param_digest"]  # order-free
    everything = decay_settings(trainable, trainable)
    assert everything["decay_bn_and_bias"] is True and everything["decayed_param_digest"] != kernels[
        "decayed_param_digest"]
    assert decay_settings([], trainable)["decay_bn_and_bias"] is None  # nothing decays: nothing to say
    assert decay_settings(["conv.kernel", "bn.gamma"], trainable)["decay_bn_and_bias"].startswith("mixed ")


def test_capped_epoch_fetches_only_its_steps_and_closes_the_pipeline():
    """max_steps_per_epoch: no batch is built past the last step, and the pipeline is closed every epoch."""
    from common.config import RunSpec
    from common.loop import train

    fetched, closed = [], []

    class Backend:
        def synchronize(self):
            pass

        def to_numpy(self, value):
            return np.asarray(value)

        def train_batches(self, plan):
            try:
                for index in range(plan.num_batches):
                    fetched.append(index)
                    yield np.zeros((4, 1)), np.zeros(4, np.int64)
            finally:
                closed.append(len(fetched))

        def eval_batches(self):
            yield np.zeros((6, 1)), np.zeros(6, np.int64)

    spec = RunSpec(model="seed_cnn", backend="torch", max_steps_per_epoch=3, warmup_steps=0,
                   recipe=Recipe(batch_size=4, epochs=2))
    result = train(Backend(), lambda x, y, lr: (np.float32(1.0), np.int64(1)), lambda x: np.zeros((6, 10)),
                   spec, num_train=40, test_labels=np.zeros(6, np.int64))
    assert result.status == "ok" and result.state.global_step == 6
    assert fetched == [0, 1, 2, 0, 1, 2]  # 10 batches per epoch, 3 built
    assert closed == [3, 6]  # each epoch's generator finished when its epoch ended
