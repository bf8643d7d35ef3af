"""`dualbench data prepare --data SPEC`: decode a dataset once, cache it, print what it holds."""
from __future__ import annotations

import argparse
import time

import numpy as np

from common.data import DATASET_SPECS, Dataset, default_cache_dir, load_dataset


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


class _ActionParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, pointing at the full command's help
        self.exit(2, f"dualbench: error: {message} (see `{self.prog} --help`)\n")


def register(parser: argparse.ArgumentParser) -> None:
    """Add the `data` actions (currently `prepare`) to the `data` subparser."""
    actions = parser.add_subparsers(dest="data_action", required=True, metavar="ACTION",
                                    parser_class=_ActionParser)
    prepare = actions.add_parser(
        "prepare", help="decode and cache a dataset; print counts, classes and fingerprint",
        description="Decode a dataset SPEC once into the cache and print counts per split and class, "
                    "class names, image shape, the SHA-256 fingerprint and whether it came from the cache.")
    forms = ", ".join(pattern for pattern, _ in DATASET_SPECS)
    prepare.add_argument("--data", required=True, metavar="SPEC", help=f"dataset SPEC: {forms}")
    prepare.add_argument("--train-subset", type=_positive_int, default=None, metavar="IMAGES",
                         help="keep a stratified subset of this many training images (default: all)")
    prepare.add_argument("--test-subset", type=_positive_int, default=None, metavar="IMAGES",
                         help="keep a stratified subset of this many test images (default: all)")
    prepare.add_argument("--seeds", default="0",
                         help="comma-separated seeds of the subset choice, as `dualbench run --seeds`; each "
                              "subset is prepared (default 0)")
    prepare.add_argument("--seed", dest="seeds", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    prepare.add_argument("--cache-dir", default=None, metavar="DIR",
                         help="cache root (default: $DUALBENCH_CACHE, else ~/.cache/dualbench)")
    prepare.add_argument("--no-progress", action="store_true", help="no progress bars on stderr (default: shown)")


def main(args: argparse.Namespace) -> int:
    """Run the chosen `data` action; returns the exit code."""
    if args.data_action == "prepare":
        return prepare(args)
    raise AssertionError(f"unhandled data action {args.data_action!r}")  # argparse rejects others


def prepare(args: argparse.Namespace) -> int:
    """Load (decode or read from cache) ``args.data`` and print its summary, once per seed's subset."""
    from compare.options import parse_seeds

    seeds = parse_seeds(args.seeds)
    if not (args.train_subset or args.test_subset):
        seeds = seeds[:1]  # without a subset the seed chooses nothing
    for seed in seeds:
        started = time.perf_counter()
        dataset = load_dataset(args.data, train_subset=args.train_subset, test_subset=args.test_subset,
                               subset_seed=seed, cache_dir=args.cache_dir, progress=not args.no_progress)
        for line in summary_lines(dataset, args, time.perf_counter() - started, seed):
            print(line)
    return 0


def summary_lines(dataset: Dataset, args: argparse.Namespace, elapsed_s: float, seed: int = 0) -> list[str]:
    """The printed summary: header fields, then a per-class count table."""
    height, width, channels = dataset.in_shape
    source = "served from cache" if dataset.from_cache else "decoded from the source and cached"
    lines = [
        f"dataset      {dataset.spec}",
        f"source       {source}",
        f"cache        {args.cache_dir or default_cache_dir()}",
        f"image shape  {height} x {width} x {channels} (H x W x C, uint8)",
        f"classes      {dataset.num_classes}: {', '.join(dataset.class_names)}",
        f"train        {len(dataset.train_labels)} images",
        f"test         {len(dataset.test_labels)} images",
    ]
    if args.train_subset or args.test_subset:
        lines.append(f"subset       stratified, seed {seed} (train {args.train_subset or 'all'}, "
                     f"test {args.test_subset or 'all'})")
    if dataset.verification:
        lines.append(f"check        {dataset.verification}")
    lines += [f"fingerprint  sha256:{dataset.fingerprint}", f"time         {elapsed_s:.2f} s", ""]
    return lines + class_table(dataset)


def class_table(dataset: Dataset) -> list[str]:
    """Per-class image counts of both splits, with a total row."""
    train = np.bincount(dataset.train_labels, minlength=dataset.num_classes)
    test = np.bincount(dataset.test_labels, minlength=dataset.num_classes)
    width = max(5, *(len(name) for name in dataset.class_names))
    rows = [f"{'class':<{width}}  {'train':>7}  {'test':>7}"]
    rows += [f"{name:<{width}}  {train[i]:>7}  {test[i]:>7}" for i, name in enumerate(dataset.class_names)]
    rows.append(f"{'total':<{width}}  {train.sum():>7}  {test.sum():>7}")
    return rows
