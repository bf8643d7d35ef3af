"""Time to accuracy from hand-made RunResults: first crossing, 'not reached', medians, head to head."""
from __future__ import annotations

import math

import pytest

from common.results import RunResult
from compare import time_to_accuracy as tta
from compare.tables import build_tables


def _run(backend, seed, curve, target=0.8, every=None):
    """A run evaluated at the (wall_s, accuracy) points of ``curve``, 100 steps apart."""
    rows = [{"step": 100 * (i + 1), "epoch": (i + 1) / 2, "test_accuracy": acc, "wall_s": wall,
             "eval_s": 0.5, "epoch_end": i % 2 == 1} for i, (wall, acc) in enumerate(curve)]
    return RunResult(run_id=f"m__{backend}__seed{seed}", model="m", backend=backend, seed=seed,
                     test_accuracy=curve[-1][1], evaluations=rows,
                     spec={"target_accuracy": target, "eval_every_steps": every, "recipe": {}})


RUNS = [
    _run("torch", 0, [(10, 0.5), (20, 0.79), (30, 0.81), (40, 0.9)]),  # reached at 30 s (0.79 is not 0.8)
    _run("torch", 1, [(11, 0.6), (22, 0.8), (33, 0.7)]),  # reached exactly at 22 s, even if it drops later
    _run("tensorflow", 0, [(9, 0.5), (18, 0.85)]),
    _run("tensorflow", 1, [(9, 0.5), (18, 0.75)]),  # never reached
]


def test_first_evaluation_reaching_the_target():
    assert tta.first_reaching(RUNS[0], 0.8)["wall_s"] == 30
    assert tta.first_reaching(RUNS[1], 0.8)["step"] == 200
    assert tta.first_reaching(RUNS[3], 0.8) is None


def test_seed_table_reports_not_reached_plainly():
    seeds = tta.seed_table(RUNS, 0.8).set_index(["backend", "seed"])
    assert seeds.loc[("torch", 0), "tta_s"] == 30 and seeds.loc[("torch", 0), "tta_step"] == 300
    assert not seeds.loc[("tensorflow", 1), "reached"] and math.isnan(seeds.loc[("tensorflow", 1), "tta_s"])
    assert seeds.loc[("tensorflow", 1), "best_acc_pct"] == pytest.approx(75)
    assert seeds.loc[("torch", 0), "eval_s_total"] == 2.0  # four evaluations of 0.5 s, apart from the clock


def test_median_counts_not_reached_as_infinitely_slow():
    assert tta.median_time([30.0, 22.0]) == 26.0
    assert tta.median_time([18.0, math.nan, 20.0]) == 20.0  # one of three not reached: still a median
    assert math.isnan(tta.median_time([18.0, math.nan]))  # half not reached: the median is not reached
    summary = tta.summary_table(tta.seed_table(RUNS, 0.8)).set_index("backend")
    assert summary.loc["torch", "tta_median"] == "26.0 s" and summary.loc["torch", "seeds_reached"] == "2/2"
    assert summary.loc["tensorflow", "tta_median"] == "not reached"
    assert summary.loc["tensorflow", "tta_per_seed"] == "seed 0: 18.0 s, seed 1: not reached"


def test_head_to_head_carries_time_to_accuracy_per_framework():
    row = build_tables(RUNS)["head_to_head"].iloc[0]
    assert row["comparison"] == "tensorflow/torch" and row["target_acc_pct"] == 80
    assert row["tta_base"] == "median 26.0 s (2/2 seeds reached; seed 0: 30.0 s, seed 1: 22.0 s)"
    assert row["tta_other"].startswith("median not reached (1/2 seeds reached; seed 0: 18.0 s, seed 1: not reached")
    assert math.isnan(row["tta_ratio"])
    easier = build_tables(RUNS, target_accuracy=0.5)["head_to_head"].iloc[0]  # dualbench report --target-accuracy
    assert easier["tta_ratio"] == pytest.approx(9 / 10.5)


def test_no_target_no_time_to_accuracy():
    runs = [_run("torch", 0, [(10, 0.5)], target=None), _run("tensorflow", 0, [(9, 0.6)], target=None)]
    tables = build_tables(runs)
    assert tables["time_to_accuracy"].empty and tables["head_to_head"].iloc[0]["tta_base"] == ""


def test_results_without_evaluation_rows_fall_back_to_epoch_rows():
    old = RunResult(run_id="m__torch__seed0", model="m", backend="torch", seed=0, spec={"target_accuracy": 0.6},
                    epochs=[{"epoch": 1, "test_accuracy": 0.5, "wall_s": 5.0},
                            {"epoch": 2, "test_accuracy": 0.7, "wall_s": 9.0}])
    assert tta.first_reaching(old, 0.6)["wall_s"] == 9.0


def test_the_scaling_table_reads_the_same_time_to_accuracy():
    """One --target-accuracy, one definition: the scaling table's time_to_target_s is the head to head's,
    mid-epoch evaluations included, per world size (the runs' own target unless overridden)."""
    import dataclasses

    from compare.scaling import scaling_table

    world2 = [dataclasses.replace(r, run_id=r.run_id + "__world2", world_size=2, train_images_per_sec=1.0,
                                  spec={**r.spec, "nproc": 2, "recipe": {"batch_size": 8}}) for r in RUNS]
    world1 = [dataclasses.replace(r, train_images_per_sec=1.0, spec={**r.spec, "recipe": {"batch_size": 8}})
              for r in RUNS]
    target = tta.target_of(world1 + world2)
    assert target == 0.8
    table = scaling_table(world1 + world2, target).set_index(["backend", "world_size"])
    assert table.loc[("torch", 1), "time_to_target_s"] == table.loc[("torch", 2), "time_to_target_s"] == 26.0
    assert math.isnan(table.loc[("tensorflow", 2), "time_to_target_s"])  # half the seeds never reached it
    assert scaling_table(world2, 0.5).set_index(["backend", "world_size"]).loc[("tensorflow", 2),
                                                                                "time_to_target_s"] == 9.0
