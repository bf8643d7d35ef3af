"""`dualbench tune`: measure each framework's best execution configuration on this machine and cache it.

For every (model, backend) it runs the search of compare.tune (one worker
process per candidate configuration, correctness gate first), prints the
search table and the choice, and stores the choice in the per-machine cache
that `dualbench run` / `bench` read with ``--mode auto``. A cached result is
printed again without measuring, unless ``--retune``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from common.config import Recipe
from compare import options


def register(parser: argparse.ArgumentParser) -> None:
    options.add_selection_options(parser)
    p = parser.add_argument
    p("--data", default=None, metavar="SPEC",
      help="dataset SPEC whose shapes the search uses (default synthetic, CIFAR-shaped)")
    p("--device", default=None, help="auto | cpu | cuda | cuda:N (default auto: the first GPU, else the CPU)")
    p("--precision", default=None, choices=("fp32", "bf16", "fp16"), help="compute precision (default fp32)")
    p("--batch-size", type=int, default=None, metavar="IMAGES",
      help=f"images per training step (default {Recipe().batch_size})")
    p("--threads", type=int, default=None,
      help="intra-op threads for both frameworks (default: every core this process may use)")
    p("--channels-last", choices=tuple(options.CHANNELS_LAST), default="auto",
      help="torch memory format (default auto: searched; on/off pins it)")
    p("--mode", default="auto",
      help="as for `dualbench run` (default auto); a backend with a pinned mode is not searched")
    options.add_tune_options(parser)
    p("--quick", action="store_true",
      help="fewer steps per candidate, a smoke test of the search, not a measurement (default off)")
    p("--json", action="store_true", help="print the resolution records as JSON (default: tables)")
    p("--out", default=None, metavar="CSV", help="also write the search table as CSV here (default: not written)")


def build_specs(args: argparse.Namespace):
    """One validated RunSpec per (model, backend), seed 0, and the dataset."""
    from common.data import load_dataset
    from common.data.defaults import apply_defaults, dataset_defaults

    models, backends = options.parse_selection(args)
    modes = options.parse_modes(args.mode, backends)
    options.check_tune_budget(args)
    recipe = options.build_recipe(argparse.Namespace(**{**dict.fromkeys(options.RECIPE_FLAGS),
                                                        "batch_size": args.batch_size}))
    shared = {k: v for k, v in {"data": args.data, "device": args.device, "precision": args.precision,
                                "threads": args.threads}.items() if v is not None}
    shared["channels_last"] = options.CHANNELS_LAST[args.channels_last]
    specs = [options.make_spec(m, b, 0, modes[b], recipe, shared) for m in models for b in backends]
    dataset = load_dataset(specs[0].data, progress=sys.stderr.isatty())
    # the dataset's augmentation and normalisation (1-channel statistics for MNIST...), as `dualbench run` has them
    recipe = apply_defaults(recipe, dataset_defaults(specs[0].data, dataset), {})
    return [dataclasses.replace(spec, recipe=recipe) for spec in specs], dataset


def main(args: argparse.Namespace) -> int:
    from compare.tables import to_text
    from compare.tune_report import choices_frame, search_frame
    from compare.tune_resolve import Resolver

    specs, dataset = build_specs(args)
    resolver = Resolver(dataset, retune=args.retune, search_if_missing=True, complete_partial=True,
                        budget_s=args.tune_budget_s,
                        quick=args.quick)
    resolver.resolve(specs)
    records = resolver.summary()
    if args.json:
        print(json.dumps(records, indent=2, default=str))
        return 0
    table = search_frame(records)
    if args.out:
        from compare.store import write_file_atomic

        write_file_atomic(args.out, table.to_csv(index=False).encode("utf-8"))
    print(f"machine fingerprint {resolver.cache.path.stem} (cache: {resolver.cache.path})")
    if not table.empty:
        print("\nSearch table (images/s: median of each candidate's timed training steps):")
        print(to_text(table.drop(columns=["onednn_read_back"])))
    print("\nChosen execution configurations:")
    print(to_text(choices_frame(records)))
    failed = [r for r in records if r.get("how") == "fallback" and r.get("search")]
    return 1 if failed else 0
