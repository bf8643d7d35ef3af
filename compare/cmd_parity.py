"""`dualbench parity --models all`: prove the architectures match across frameworks."""
from __future__ import annotations

import argparse
import json

from common.config import INIT_SCHEMES
from common.registry import parse_models
from compare import options
from compare.parity import DEFAULT_RTOL, run_parity

SUMMARY_COLUMNS = ["model", "seed", "torch_trainable_params", "tf_trainable_params", "spec_trainable_params",
                   "published_params", "torch_buffers", "tf_buffers", "macs_per_image", "round_trip_exact",
                   "max_abs_diff", "max_rel_diff", "first_divergent_layer_eval", "first_divergent_layer_train", "passed"]


def register(parser: argparse.ArgumentParser) -> None:
    """Options of `dualbench parity` (the same names as `dualbench run` where they mean the same)."""
    p = parser.add_argument
    p("--models", default="all", help="comma-separated model names or globs (default: all)")
    p("--batch-size", type=int, default=8, metavar="IMAGES", help="images in the probe batch (default 8)")
    options.add_alias(parser, "--batch", "--batch-size", type=int)
    p("--seeds", default="0", help="comma-separated seeds of the shared weights and probe images; each is "
                                   "checked (default 0)")
    options.add_alias(parser, "--seed", "--seeds")
    p("--init", default="torch_default", choices=INIT_SCHEMES,
      help="initial-weights scheme of the shared weights (default torch_default)")
    p("--rtol", type=float, default=DEFAULT_RTOL,
      help=f"largest max |logit difference| / max |logit| allowed (default {DEFAULT_RTOL:g})")
    p("--num-classes", type=int, default=10, help="classes of the model head (default 10)")
    p("--in-shape", default="32,32,3", help="H,W,C of the input, in pixels and channels (default 32,32,3)")
    p("--layers", action="store_true", help="print the full per-layer table (default: diverged layers only)")
    p("--json", action="store_true", help="print JSON, one object per model and seed (default: tables)")
    p("--training", action="store_true",
      help="also prove training parity step by step (compare.step_parity: each framework makes the other's "
           "step from the other's state, 10 steps per case; a few minutes) (default off)")


def main(args: argparse.Namespace) -> int:
    from common.errors import ConfigError

    models = parse_models(args.models)
    if args.batch_size < 2:
        raise ConfigError("--batch-size must be at least 2 (training-mode BN needs a batch)")
    in_shape = options.parse_in_shape(args.in_shape)
    reports = []
    for seed in options.parse_seeds(args.seeds):
        found = run_parity(models, num_classes=args.num_classes, in_shape=in_shape, batch=args.batch_size,
                           seed=seed, init_scheme=args.init, rtol=args.rtol)
        reports += [{"seed": seed, **report} for report in found]
    training = _training_parity(models) if args.training else []
    if args.json:
        print(json.dumps({"forward": [{k: v for k, v in r.items() if not k.startswith("layers_")} for r in reports],
                          "training": training}, indent=2) if args.training else
              json.dumps([{k: v for k, v in r.items() if not k.startswith("layers_")} for r in reports], indent=2))
    else:
        _print_tables(reports, args.layers)
        if training:
            _print_training(training)
    return 0 if all(r["passed"] for r in reports) and all(t["passed"] for t in training) else 1


def _training_parity(models: list[str]) -> list[dict]:
    """One summary per step-parity case of the selected models: worst per criterion, free-run drift."""
    import shutil

    from compare.step_parity import CASES, STEP_TOLERANCE, failures, make_case, run_cases, step_rows, trajectory_rows

    names = [n for n, c in CASES.items() if c["model"] in models
             and (c["modes"]["torch"] != "compile" or shutil.which("g++"))]
    cases = [make_case(n) for n in names]
    results = run_cases(cases) if cases else {}
    out = []
    for case in cases:
        rows = step_rows(case, results[case["name"]])
        drift = trajectory_rows(case, results[case["name"]])[-1]
        found = failures(case, rows)
        out.append({"case": case["name"], "modes": "/".join(case["modes"].values()),
                    **{k: max(r[k] for r in rows) for k in (*STEP_TOLERANCE, "update_rel")},
                    "free_run_weights_rel": drift["weights_rel"], "free_run_loss_rel": drift["loss_rel"],
                    "passed": not found, "first_failure": found[0] if found else ""})
    return out


def _print_training(training: list[dict]) -> None:
    import pandas as pd

    from compare.step_parity import STEP_TOLERANCE

    limits = ", ".join(f"{k} <= {v:g}" for k, v in STEP_TOLERANCE.items())
    print(f"\nTraining parity, step by step (worst over 10 steps x both directions; {limits}; update_rel and "
          "the free-run drift after the last step are reported, not judged)")
    print(pd.DataFrame(training).drop(columns="first_failure").to_markdown(index=False, floatfmt=".1e"))
    failed = [t for t in training if not t["passed"]]
    print("TRAINING PARITY " + ("FAILED: " + "; ".join(t["first_failure"] for t in failed) if failed else "PASSED"))


def _print_tables(reports: list[dict], full_layers: bool) -> None:
    import pandas as pd  # lazily: keeps every other `dualbench` command's start-up fast

    summary = pd.DataFrame(reports)[SUMMARY_COLUMNS]
    summary["published_params"] = summary["published_params"].astype("Int64")  # None -> <NA>, not nan
    print("Parity summary (counts, exact weight round trip, worst logit difference over modes/directions)")
    print(summary.to_markdown(index=False))
    directions = [c for c in reports[0] if c.endswith("_max_rel_diff") and c != "max_rel_diff"]
    print("\nLogit max |difference| / max |logit| by BN mode and direction")
    print(pd.DataFrame(reports)[["model", "seed", *directions]].to_markdown(index=False, floatfmt=".2e"))
    rows = [row for r in reports for mode in ("eval", "train") for row in r[f"layers_{mode}"]]
    layers = pd.DataFrame(rows)
    if not full_layers:
        layers = layers[layers["diverged"]] if layers["diverged"].any() else layers.groupby(
            ["model", "mode"]).tail(1)
    print("\nPer-layer activations" + ("" if full_layers else " (diverged layers, else each model's last)"))
    print(layers.to_markdown(index=False, floatfmt=".2e"))
    failed = [r["model"] for r in reports if not r["passed"]]
    print("\nPARITY " + ("FAILED for " + ", ".join(failed) if failed else "PASSED for all models"))
