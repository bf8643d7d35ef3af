"""`dualbench run --tensorboard DIR --eval-every-steps S --target-accuracy A --retrieval` end to end (fake backends).

TensorBoard event files are read back with tensorboard's own reader (EventAccumulator): both
backends' runs carry the same tags at the same steps.
"""
from __future__ import annotations

import json

import pytest

from common.registry import EXTRA_BACKENDS_ENV
from compare.tensorboard import CONFUSION_TAG, SCALAR_TAGS
from tests.runner_helpers import FAKES, SMALL, rows, run_cli

FLAGS = ["--eval-every-steps", "3", "--target-accuracy", "0.3", "--retrieval"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One run of two fake backends x two seeds with every flag; (out, tensorboard dir, exit code)."""
    root = tmp_path_factory.mktemp("observability")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(EXTRA_BACKENDS_ENV, FAKES)
        patch.setenv("DUALBENCH_CACHE", str(root / "cache"))
        patch.delenv("DUALBENCH_FAKE_FAULT", raising=False)
        code = run_cli("run", "--models", "seed_cnn", "--backends", "fakea,fakeb", "--seeds", "0,1", *SMALL,
                       *FLAGS, "--tensorboard", str(root / "tb"), "--out", str(root / "out"))
        yield root / "out", root / "tb", code


def _events(folder):
    from compare.tensorboard import EventFileWriter  # noqa: F401  (the TF-free switch is set on import)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def _scalars(accumulator) -> dict[str, list[int]]:
    return {tag: [event.step for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_both_backends_log_the_same_tags_at_the_same_steps(finished):
    out, tb, code = finished
    assert code == 0
    for seed in (0, 1):
        a, b = _events(tb / "seed_cnn" / "fakea" / f"seed{seed}"), _events(tb / "seed_cnn" / "fakeb" / f"seed{seed}")
        steps_a, steps_b = _scalars(a), _scalars(b)
        assert steps_a == steps_b
        # CPU: no device allocator peak on either side; everything else on both
        assert set(steps_a) == set(SCALAR_TAGS) - {"memory/device_peak_mib"}
        # 8 steps per epoch, 2 epochs, evaluations every 3 steps and at epoch ends
        assert steps_a["test/accuracy"] == [3, 6, 8, 9, 12, 15, 16]
        assert a.Tags()["images"] == b.Tags()["images"] == [CONFUSION_TAG]
        assert a.Images(CONFUSION_TAG)[0].step == 16 and a.Images(CONFUSION_TAG)[0].width > 100
        hparams = set(a.PluginTagToContent("hparams"))
        assert hparams == set(b.PluginTagToContent("hparams")) == {
            "_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"}


def test_event_wall_times_follow_the_training_clock(finished):
    out, tb, _ = finished
    accumulator = _events(tb / "seed_cnn" / "fakeb" / "seed1")
    row = rows(out)["seed_cnn__fakeb__seed1"]
    clock = [event.value for event in accumulator.Scalars("time/train_wall_s")]
    assert clock == pytest.approx([r["wall_s"] for r in row["evaluations"]], rel=1e-6)
    walls = [event.wall_time for event in accumulator.Scalars("test/accuracy")]
    assert [w - walls[0] for w in walls] == pytest.approx([c - clock[0] for c in clock], abs=1e-3)


def test_hparams_hold_the_runs_settings(finished):
    from tensorboard.plugins.hparams import plugin_data_pb2

    _, tb, _ = finished
    accumulator = _events(tb / "seed_cnn" / "fakea" / "seed0")
    content = accumulator.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert start.hparams["backend"].string_value == "fakea" and start.hparams["seed"].number_value == 0
    assert start.hparams["eval_every_steps"].number_value == 3 and start.hparams["recipe.batch_size"].number_value == 32


def test_time_to_accuracy_in_the_tables_and_the_report(finished):
    out, _, _ = finished
    import pandas as pd

    seeds = pd.read_csv(out / "time_to_accuracy.csv")
    assert len(seeds) == 4 and set(seeds["target_acc_pct"]) == {30.0}
    head = pd.read_csv(out / "head_to_head.csv").iloc[0]
    assert head["target_acc_pct"] == 30.0 and "seed 0:" in head["tta_base"] and "seed 1:" in head["tta_other"]
    report = (out / "report.md").read_text()
    assert "## Time to accuracy" in report and "evaluations, process start-up and data loading" in report
    assert "--eval-every-steps 3 --target-accuracy 0.3" in json.loads((out / "manifest.json").read_text())["command"]


def test_a_new_target_on_a_finished_folder_trains_nothing_and_reports_the_new_target(finished, tmp_path):
    out, tb, _ = finished
    before = (out / "runs.jsonl").read_text()
    code = run_cli("run", "--models", "seed_cnn", "--backends", "fakea,fakeb", "--seeds", "0,1", *SMALL,
                   "--eval-every-steps", "3", "--target-accuracy", "0.2", "--out", str(out))
    assert code == 0 and (out / "runs.jsonl").read_text() == before  # every run skipped as done
    import pandas as pd

    assert set(pd.read_csv(out / "time_to_accuracy.csv")["target_acc_pct"]) == {20.0}


def test_retrieval_metrics_and_agreement_for_every_run(finished):
    out, _, _ = finished
    retrieval = json.loads((out / "retrieval.json").read_text())
    assert sorted((m["backend"], m["seed"], m["status"]) for m in retrieval["metrics"]) == [
        ("fakea", 0, "ok"), ("fakea", 1, "ok"), ("fakeb", 0, "ok"), ("fakeb", 1, "ok")]
    for metric in retrieval["metrics"]:
        assert 0 < metric["map@r"] <= metric["recall@1"] <= metric["recall@5"] <= metric["recall@10"] <= 1
        assert (metric["queries"], metric["gallery"]) == (128, 256)
    # every run's weights embedded by both "frameworks": both directions for both seeds, all agreeing
    pairs = sorted((a["seed"], a["weights_of"], a["agrees"]) for a in retrieval["agreement"])
    assert pairs == [(0, "fakea", True), (0, "fakeb", True), (1, "fakea", True), (1, "fakeb", True)]
    report = (out / "report.md").read_text()
    assert "## Image retrieval" in report and "Cross-framework agreement" in report


def test_retrieval_command_sees_embeddings_that_disagree(finished, monkeypatch):
    out, _, _ = finished
    monkeypatch.setenv(EXTRA_BACKENDS_ENV, FAKES)
    monkeypatch.setenv("DUALBENCH_FAKE_FAULT", "fakeb:embedshift")  # fakeb embeds 1% larger than fakea
    assert run_cli("retrieval", str(out)) == 1
    agreement = json.loads((out / "retrieval.json").read_text())["agreement"]
    assert agreement and not any(a["agrees"] for a in agreement)
    assert all(a["max_rel_diff"] == pytest.approx(0.01 / 1.01, rel=1e-3) for a in agreement)


@pytest.mark.parametrize("flags, message", [
    (["--target-accuracy", "85"], "--target-accuracy is a fraction in (0, 1]"),
    (["--eval-every-steps", "0"], "eval_every_steps must be a positive number"),
    (["--mean", "0.5,x"], "expected comma-separated numbers"),
])
def test_bad_values_are_one_line_errors(flags, message, capsys, tmp_path):
    assert run_cli("run", "--models", "seed_cnn", "--backends", "torch", *flags, "--out", str(tmp_path)) == 2
    assert message in capsys.readouterr().err


def test_unwritable_tensorboard_folder_and_missing_weights_are_refused(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = run_cli("run", "--models", "seed_cnn", "--backends", "torch", "--data", "synthetic",
                   "--tensorboard", str(blocker / "tb"), "--out", str(tmp_path / "out"))
    assert code == 2 and "choose a writable --tensorboard folder" in capsys.readouterr().err
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "runs.jsonl").write_text(json.dumps({"run_id": "m__torch__seed0", "model": "m",
                                                             "backend": "torch", "seed": 0}) + "\n")
    assert run_cli("retrieval", str(tmp_path / "old")) == 2
    assert "has its final weights" in capsys.readouterr().err


def test_a_keras_fit_run_is_its_own_tensorboard_run_and_retrieval_series(tmp_path):
    """Keras's fit style beside the custom step of the same backend: its own TensorBoard folder (never the
    custom run's), its own retrieval label (the tables' series name)."""
    from common.results import RunResult
    from compare.retrieval import _metric_row
    from compare.tensorboard import hparams, run_dir

    custom, fit = (RunResult(run_id=f"seed_cnn__tensorflow{tag}__seed0", model="seed_cnn", backend="tensorflow",
                             seed=0, spec={"style": style}) for tag, style in (("", "custom"), ("-fit", "fit")))
    assert run_dir(tmp_path, custom) == tmp_path / "seed_cnn" / "tensorflow" / "seed0"
    assert run_dir(tmp_path, fit) == tmp_path / "seed_cnn" / "tensorflow-fit" / "seed0"
    assert hparams(fit)["style"] == "fit" and hparams(custom)["style"] == "custom"
    assert [_metric_row(r, None, "x")["backend"] for r in (custom, fit)] == ["tensorflow", "tensorflow:fit"]
