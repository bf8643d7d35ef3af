"""Report sections beyond the core tables: data, time to accuracy, image retrieval, TensorBoard.

Each function returns a list of compare.document.Block (empty when there is nothing to show);
compare.report places them.
"""
from __future__ import annotations

from typing import Any

import pandas as pd

from common.results import RunResult
from compare.document import Block


def data_blocks(results: list[RunResult], manifest: dict[str, Any]) -> list[Block]:
    """The dataset, the check it passed, and the augmentation/normalisation it was trained with."""
    from common.data.defaults import defaults_note

    spec = next((r.spec for r in results if r.spec), {})
    recipe = spec.get("recipe") or {}
    if not spec:
        return []
    run_manifest = next((r.manifest for r in results if r.manifest), {})
    check = manifest.get("data_verification") or run_manifest.get("data_verification") or "none recorded"
    augmentation = next((r.settings.get("augmentation") for r in results if r.settings.get("augmentation")), None)
    normalization = next((r.settings.get("input_normalization") for r in results
                          if r.settings.get("input_normalization")), None)
    rows = [("dataset", spec.get("data")), ("source check", check),
            ("augmentation (read back from the pipelines)", augmentation or "n/a"),
            ("normalisation (read back from the pipelines)", normalization or "n/a"),
            ("dataset defaults", defaults_note(recipe))]
    table = pd.DataFrame([{"item": k, "value": str(v)} for k, v in rows], columns=["item", "value"])
    return [Block("h2", "Data"), Block("table", table=table)]


def time_to_accuracy_blocks(tables: dict[str, pd.DataFrame]) -> list[Block]:
    """The time-to-accuracy table per model and framework, with how it is measured."""
    summary = tables.get("time_to_accuracy_summary")
    if summary is None or summary.empty:
        return []
    target = summary["target_acc_pct"].iloc[0]
    shown = summary.drop(columns=["tta_median_s"])
    return [Block("h2", "Time to accuracy"),
            Block("p", f"Training wall-clock until the first evaluation with test accuracy >= {target:g}% "
                       "(DAWNBench / MLPerf Training). The clock is the run's training clock: compile step, pipeline "
                       "build and teardown and every step included; evaluations, process start-up and data loading "
                       "excluded (eval_s_total_median: the evaluations' own cost, shown apart). Runs are evaluated "
                       "at epoch ends and every eval_every_steps steps when set, so a time is an upper bound by up "
                       "to one evaluation interval. The median counts a seed that did not reach the target as "
                       "infinitely slow: it is 'not reached' when half the seeds or more did not reach it. "
                       "time_to_accuracy.csv has every seed's step, epoch and best accuracy."),
            Block("table", table=shown)]


def retrieval_blocks(store: Any, results: list[RunResult]) -> list[Block]:
    """Recall@k and mAP@R per framework, and the embeddings' cross-framework agreement."""
    from compare.retrieval import load_retrieval, stale_runs

    retrieval = load_retrieval(store)
    if retrieval is None:
        return []
    metrics, agreement = retrieval["metrics"], retrieval["agreement"]
    blocks = [Block("h2", "Image retrieval"),
              Block("p", "Each trained model embeds the test split (queries) and the training split (gallery) with "
                         "its penultimate layer (the classifier's input, eval mode); the gallery is ranked by cosine "
                         "similarity and an item is relevant when it has the query's class. recall@k: queries with "
                         "a relevant item among the first k; map@r: mean average precision over the first R "
                         "results, R = the query class's gallery size (Musgrave et al. 2020). Mean over seeds "
                         "below; retrieval.csv has every run.")]
    if not metrics.empty:
        ok = metrics[metrics["status"] == "ok"]
        columns = ["recall@1", "recall@5", "recall@10", "map@r"]
        mean = ok.groupby(["model", "backend"], sort=False)[columns + ["embedding_dim"]].mean().reset_index()
        mean.insert(2, "seeds", ok.groupby(["model", "backend"], sort=False).size().values)
        blocks.append(Block("table", table=mean))
        failed = metrics[metrics["status"] != "ok"]
        if not failed.empty:
            blocks.append(Block("table", table=failed[["model", "backend", "seed", "error"]]))
    if not agreement.empty:
        blocks += [Block("p", f"Cross-framework agreement: every run's final weights embedded by both frameworks; "
                              f"max |difference| over all query embeddings relative to the embedding scale, "
                              f"criterion <= {retrieval['rtol']:g} (the forward-parity criterion)."),
                   Block("table", table=agreement, highlight=[not flag for flag in agreement["agrees"]])]
    stale = stale_runs(retrieval, results)
    if stale:
        blocks.append(Block("p", f"**Stale:** {', '.join(stale)} were rerun after these retrieval figures were "
                                 f"computed; run `dualbench retrieval {store.root}` again."))
    return blocks


def tensorboard_blocks(manifest: dict[str, Any]) -> list[Block]:
    """Where the TensorBoard logs are and how to open them."""
    folder = manifest.get("tensorboard_dir")
    if not folder:
        return []
    return [Block("h2", "TensorBoard"),
            Block("p", "Both frameworks' runs were logged with the same tags and steps (written by dualbench from "
                       "each RunResult): DIR/<model>/<backend>/seed<k>. Overlay them with:"),
            Block("code", text=f"tensorboard --logdir {folder}")]
