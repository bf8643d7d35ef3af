"""`dualbench parity --models all`: prove the architectures match across frameworks."""
from __future__ import annotations

import argparse
import json



from common.registry import parse_models
from compare.options import parse_in_shape
from compare.parity import DEFAULT_ATOL, run_parity

SUMMARY_COLUMNS = ["model", "torch_trainable_params", "tf_trainable_params", "spec_trainable_params",
                   "published_params", "torch_buffers", "tf_buffers", "macs_per_image", "round_trip_exact",
                   "max_abs_diff", "first_divergent_layer_eval", "first_divergent_layer_train", "passed"]


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="all", help="comma-separated names or globs (default: all)")
    parser.add_argument("--batch", type=int, default=8, help="images in the probe batch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the probe images")
    parser.add_argument("--init", default="torch_default", help="init scheme of the shared weights")
    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL, help="max abs logit difference allowed")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--in-shape", default="32,32,3", help="H,W,C of the input")
    parser.add_argument("--layers", action="store_true", help="print the full per-layer table")
    parser.add_argument("--json", action="store_true", help="print a JSON list, one object per model")


def main(args: argparse.Namespace) -> int:
    from common.errors import ConfigError

    models = parse_models(args.models)
    if args.batch < 2:
        raise ConfigError("--batch must be at least 2 (training-mode BN needs a batch)")
    reports = run_parity(models, num_classes=args.num_classes, in_shape=parse_in_shape(args.in_shape),
                         batch=args.batch, seed=args.seed, init_scheme=args.init, atol=args.atol)
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if not k.startswith("layers_")} for r in reports],
                         indent=2))
    else:
        _print_tables(reports, args.layers)
    return 0 if all(r["passed"] for r in reports) else 1


def _print_tables(reports: list[dict], full_layers: bool) -> None:
    import pandas as pd  # lazily: keeps every other `dualbench` command's start-up fast

    summary = pd.DataFrame(reports)[SUMMARY_COLUMNS]
    summary["published_params"] = summary["published_params"].astype("Int64")  # None -> <NA>, not nan
    print("Parity summary (counts, exact weight round trip, worst logit difference over modes/directions)")
    print(summary.to_markdown(index=False))
    directions = [c for c in reports[0] if c.endswith("_max_abs_diff") and c != "max_abs_diff"]
    print("\nLogit max abs difference by BN mode and direction")
    print(pd.DataFrame(reports)[["model", *directions]].to_markdown(index=False, floatfmt=".2e"))
    rows = [row for r in reports for mode in ("eval", "train") for row in r[f"layers_{mode}"]]
    layers = pd.DataFrame(rows)
    if not full_layers:
        layers = layers[layers["diverged"]] if layers["diverged"].any() else layers.groupby(
            ["model", "mode"]).tail(1)
    print("\nPer-layer activations" + ("" if full_layers else " (diverged layers, else each model's last)"))
    print(layers.to_markdown(index=False, floatfmt=".2e"))
    failed = [r["model"] for r in reports if not r["passed"]]
    print("\nPARITY " + ("FAILED for " + ", ".join(failed) if failed else "PASSED for all models"))
