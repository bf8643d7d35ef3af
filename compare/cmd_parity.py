"""`dualbench parity --models all`: prove the architectures match across frameworks."""
from __future__ import annotations

import argparse
import json

from common.config import INIT_SCHEMES
from common.registry import parse_models
from compare import options
from compare.parity import ALIASES, DEFAULT_RTOL, REFERENCE, run_parity

DEFAULT_BACKENDS = "torch,tensorflow,keras-torch"


def summary_columns(backends: list[str]) -> list[str]:
    """The parity summary's columns for ``backends`` (counts per backend, then the verdicts)."""
    aliases = [ALIASES.get(b, b) for b in backends]
    return ["model", "seed", *(f"{a}_trainable_params" for a in aliases), "spec_trainable_params",
            "published_params", *(f"{a}_buffers" for a in aliases), "macs_per_image", "round_trip_exact",
            "max_abs_diff", "max_rel_diff", "first_divergent_layer_eval", "first_divergent_layer_train", "passed"]


def register(parser: argparse.ArgumentParser) -> None:
    """Options of `dualbench parity` (the same names as `dualbench run` where they mean the same)."""
    p = parser.add_argument
    p("--models", default="all", help="comma-separated model names or globs (default: all)")
    p("--backends", default=DEFAULT_BACKENDS,
      help=f"comma-separated backends, each compared with torch (which must be one) (default {DEFAULT_BACKENDS})")
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
    backends = options.parse_backends(args.backends)
    if REFERENCE not in backends or len(backends) < 2:
        raise ConfigError(f"--backends must hold {REFERENCE} (the reference) and at least one other backend, "
                          f"got {args.backends!r}")
    if args.batch_size < 2:
        raise ConfigError("--batch-size must be at least 2 (training-mode BN needs a batch)")
    in_shape = options.parse_in_shape(args.in_shape)
    reports = []
    for seed in options.parse_seeds(args.seeds):
        found = run_parity(models, num_classes=args.num_classes, in_shape=in_shape, batch=args.batch_size,
                           seed=seed, init_scheme=args.init, rtol=args.rtol, backends=tuple(backends))
        reports += [{"seed": seed, **report} for report in found]
    training = _training_parity(models, backends) if args.training else []
    if args.json:
        print(json.dumps({"forward": [{k: v for k, v in r.items() if not k.startswith("layers_")} for r in reports],
                          "training": training}, indent=2) if args.training else
              json.dumps([{k: v for k, v in r.items() if not k.startswith("layers_")} for r in reports], indent=2))
    else:
        _print_tables(reports, args.layers)
        if training:
            _print_training(training)
    return 0 if all(r["passed"] for r in reports) and all(t["passed"] for t in training) else 1


def _training_parity(models: list[str], backends: list[str]) -> list[dict]:
    """One summary per step-parity case and backend pair of the selected models: worst per criterion,
    free-run drift after the last step."""
    import shutil

    from compare.step_parity import CASES, STEP_TOLERANCE, failures, make_case, run_cases, step_rows, trajectory_rows

    names = [n for n, c in CASES.items() if c["model"] in models
             and (c["modes"]["torch"] != "compile" or shutil.which("g++"))]
    cases = [make_case(n) for n in names]
    results = run_cases(cases, backends=tuple(backends)) if cases else {}
    out = []
    for case in cases:
        rows, drift = step_rows(case, results[case["name"]]), trajectory_rows(case, results[case["name"]])
        for other in dict.fromkeys(r["backend"] for r in drift):
            pair = [r for r in rows if other in (r["original"], r["replayed_by"])]
            last = [r for r in drift if r["backend"] == other][-1]
            found = failures(case, pair)
            out.append({"case": case["name"], "pair": f"torch/{other}",
                        "modes": f"{case['modes']['torch']}/{case['modes'][other]}",
                        **{k: max(r[k] for r in pair) for k in (*STEP_TOLERANCE, "update_rel")},
                        "free_run_weights_rel": last["weights_rel"], "free_run_loss_rel": last["loss_rel"],
                        "passed": not found, "first_failure": found[0] if found else ""})
    return out


def _print_training(training: list[dict]) -> None:
    import pandas as pd

    from compare.step_parity import STEP_TOLERANCE

    limits = ", ".join(f"{k} <= {v:g}" for k, v in STEP_TOLERANCE.items())
    print(f"\nTraining parity, step by step, each backend against torch (worst over 10 steps x both "
          f"directions; {limits}; update_rel and "
          "the free-run drift after the last step are reported, not judged)")
    print(pd.DataFrame(training).drop(columns="first_failure").to_markdown(index=False, floatfmt=".1e"))
    failed = [t for t in training if not t["passed"]]
    print("TRAINING PARITY " + ("FAILED: " + "; ".join(t["first_failure"] for t in failed) if failed else "PASSED"))


def _print_tables(reports: list[dict], full_layers: bool) -> None:
    import pandas as pd  # lazily: keeps every other `dualbench` command's start-up fast

    summary = pd.DataFrame(reports)[summary_columns(reports[0]["backends"])]
    summary["published_params"] = summary["published_params"].astype("Int64")  # None -> <NA>, not nan
    print("Parity summary (counts, exact weight round trip, worst logit difference over modes/directions)")
    print(summary.to_markdown(index=False))
    directions = [c for c in reports[0] if c.endswith("_max_rel_diff") and c != "max_rel_diff"]
    print("\nLogit max |difference| / max |logit| by BN mode and direction (tf: tensorflow, kt: keras-torch; "
          "'torch_into_kt': keras-torch loaded torch's exported weights)")
    print(pd.DataFrame(reports)[["model", "seed", *directions]].to_markdown(index=False, floatfmt=".2e"))
    rows = [row for r in reports for mode in ("eval", "train") for row in r[f"layers_{mode}"]]
    layers = pd.DataFrame(rows)
    if not full_layers:
        layers = layers[layers["diverged"]] if layers["diverged"].any() else layers.groupby(
            ["model", "pair", "mode"]).tail(1)
    print("\nPer-layer activations" + ("" if full_layers else " (diverged layers, else each model's last)"))
    print(layers.to_markdown(index=False, floatfmt=".2e"))
    failed = [r["model"] for r in reports if not r["passed"]]
    print("\nPARITY " + ("FAILED for " + ", ".join(failed) if failed else "PASSED for all models"))
