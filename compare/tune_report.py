"""The execution-configuration search as tables: for `dualbench tune`, the results folder and the report.

``resolutions`` are the records of compare.tune_resolve.Resolver.summary():
per (backend, model) the configuration used, how it was chosen, and the
search that chose it (None when it came from a pin or the fallback).
"""
from __future__ import annotations

import json
from typing import Any

import pandas as pd

CHOICE_COLUMNS = ["model", "backend", "configuration", "how", "chosen_img_s", "default_img_s", "best_over_default"]
SEARCH_COLUMNS = ["model", "backend", "candidate", "role", "images_per_sec", "rounds", "vs_default",
                  "compile_s", "status", "chosen", "why_excluded", "onednn_read_back"]


def choices_frame(resolutions: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (model, backend): the configuration used and how far the framework default was from it."""
    rows = []
    for record in resolutions:
        search = record.get("search") or {}
        chosen, default = search.get("chosen_images_per_sec"), search.get("default_images_per_sec")
        rows.append({"model": record["model"], "backend": record["backend"], "configuration": record["label"],
                     "how": record.get("source") or record.get("how"), "chosen_img_s": chosen,
                     "default_img_s": default,
                     "best_over_default": chosen / default if chosen and default else None})
    return pd.DataFrame(rows, columns=CHOICE_COLUMNS)


def search_frame(resolutions: list[dict[str, Any]]) -> pd.DataFrame:
    """Every candidate every search measured (or skipped), with its result and why it was excluded."""
    rows = []
    for record in resolutions:
        search = record.get("search") or {}
        for row in search.get("rows", []):
            rows.append({"model": search.get("model", record["model"]),
                         "backend": search.get("backend", record["backend"]), **row})
    return pd.DataFrame(rows, columns=SEARCH_COLUMNS)


def report_blocks(tuning: dict[str, Any]) -> list[Any]:
    """The report's 'Execution configuration' section from a results folder's tuning.json."""
    from compare.document import Block

    resolutions = tuning.get("resolutions") or []
    if not resolutions:
        return []
    blocks = [Block("h2", "Execution configuration"),
              Block("p", "Each framework runs in the configuration measured fastest on this machine among those "
                         "that compute the same numbers as its reference configuration (its defaults without a compiler) (`--mode auto`, "
                         "`dualbench tune`): execution mode, memory format, oneDNN, allocator tuning, thread "
                         "pools. best_over_default: the chosen configuration's training images/s over the "
                         "framework's own defaults, both measured in the search. Rankings can flip between CPU "
                         "families, so the search runs on the machine that runs the comparison."),
              Block("table", table=choices_frame(resolutions))]
    searched = search_frame(resolutions)
    if not searched.empty:
        blocks += [Block("h3", "Search table"),
                   Block("p", "Every candidate the search measured (median images/s of its timed steps; rounds: "
                              "one value per measurement). A process-level setting (oneDNN, allocator, thread "
                              "pools) is measured in a process of its own, in turns with the incumbent's own process "
                              "(both running at once, timed one at a time, ABBA), and decided on that pair's figures; "
                              "in-process settings (execution mode, memory format) are measured side by side in "
                              "one process, alternating in ABBA blocks, and decided there (rounds marked ~; "
                              "images_per_sec of a candidate with no process of its own: the incumbent's figure "
                              "times their ratio in the shared process). Excluded: what it computed from the "
                              "seed's initial weights left "
                              "the gate's tolerance around the reference's (max difference over max reference "
                              f"value; {_tolerances(resolutions)})."),
                   Block("table", table=searched, highlight=[s == "excluded" for s in searched["status"]])]
    return blocks


def _tolerances(resolutions: list[dict[str, Any]]) -> str:
    """'eval logits and first loss 0.0001, first update and later losses 0.01' per distinct precision."""
    found = {json.dumps((r.get("search") or {}).get("gate_rtol"), sort_keys=True) for r in resolutions}
    texts = []
    for raw in sorted(found - {"null"}):
        rtol = json.loads(raw)
        texts.append(f"eval logits and first loss {rtol['forward']:g}, first update and later losses {rtol['update']:g}")
    return "; ".join(texts) or "n/a"
