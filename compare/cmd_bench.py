"""`dualbench bench`: throughput and memory only, per model, backend, precision and batch size."""
from __future__ import annotations

import argparse
import json
import sys

from common.config import PRECISIONS, series_name
from common.errors import ConfigError
from compare import options
from compare.bench import COLUMNS, BenchConfig, default_base, fit_ratio_rows, largest_fitting_batch, sweep
from compare.store import write_file_atomic

PHASES = ("train", "infer")


def register(parser: argparse.ArgumentParser) -> None:
    """Options of `dualbench bench`; --batch-size and --precision take lists here (one value is a list too)."""
    options.add_selection_options(parser, run_order=False)
    p = parser.add_argument
    p("--batch-size", default="32,128,512", metavar="IMAGES[,IMAGES...]",
      help="comma-separated batch sizes to sweep, in images per step (default 32,128,512)")
    options.add_alias(parser, "--batch-sizes", "--batch-size")
    p("--precision", default="fp32", metavar="PRECISION[,...]",
      help=f"comma-separated compute precisions among {', '.join(PRECISIONS)} (default fp32)")
    options.add_alias(parser, "--precisions", "--precision")
    p("--steps", type=int, default=20, help="timed steps per measurement, after the warm-up steps (default 20)")
    p("--phases", default="train,infer", help="comma-separated phases among train, infer (default train,infer)")
    p("--timeout", type=float, default=900, metavar="SECONDS",
      help="seconds per measurement process before it is killed (default 900)")
    p("--json", action="store_true", help="print a JSON list, one object per measurement (default: a table)")
    p("--out", default=None, metavar="CSV", help="also write the table as CSV here (default: not written)")
    p("--data", default=None, metavar="SPEC",
      help="dataset SPEC feeding the pipeline measurement (default: synthetic images, enough that the timed "
           "steps stay inside one epoch at the largest batch size)")
    options.add_execution_options(parser)
    options.add_tune_options(parser)


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated integers like 32,128,512; got {text!r}") from None
    if not values or min(values) <= 0:
        raise ConfigError(f"{flag} needs positive integers, got {text!r}")
    return values


def _choices(text: str, allowed: tuple[str, ...], flag: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in values if v not in allowed]
    if not values or bad:
        raise ConfigError(f"{flag}: unknown {bad or text!r}; choose from {', '.join(allowed)}")
    return values


def build_configs(args: argparse.Namespace) -> tuple[list[BenchConfig], tuple[str, ...]]:
    """Validate everything before any worker starts."""
    models, backends = options.parse_selection(args)
    batch_sizes = _int_list(args.batch_size, "--batch-size")
    precisions = _choices(args.precision, PRECISIONS, "--precision")
    phases = _choices(args.phases, PHASES, "--phases")
    warmup = default_base().warmup_steps if args.measure_warmup_steps is None else args.measure_warmup_steps
    if args.steps <= 0 or warmup < 0:
        raise ConfigError("--steps must be positive and --measure-warmup-steps >= 0")
    options.check_tune_budget(args)
    modes = options.parse_modes(args.mode, backends)
    series = options.parse_styles(args.style, backends)
    window = max(batch_sizes) * (args.steps + warmup)  # images the pipeline measure draws
    if args.data is None:
        n_train = max(2000, -(-window // 1000) * 1000)
        n_test = max(500, -(-max(batch_sizes) // 500) * 500)  # at least one full eval batch
        args.data = f"synthetic:{n_train},{n_test}"
    base = default_base(data=args.data, device=args.device or "auto", threads=args.threads, warmup_steps=warmup,
                        channels_last=options.CHANNELS_LAST[args.channels_last])
    from dataclasses import replace

    from common.data import load_dataset
    from common.data.defaults import apply_defaults, dataset_defaults

    dataset = load_dataset(args.data, progress=False)  # fails here, once, if missing
    base = replace(base, recipe=apply_defaults(base.recipe, dataset_defaults(args.data, dataset), {}))
    train_images = len(dataset.train_labels)
    if train_images < window:
        # Each epoch start rebuilds the pipeline (tf.data: a new graph and prefetch); in real training that
        # is amortised over a whole epoch, here it would land inside the timed steps.
        print(f"note: --data {args.data} has {train_images} training images but the pipeline measure draws "
              f"{window} at batch {max(batch_sizes)}: its figure includes epoch restarts; use a larger "
              "dataset or fewer --steps", file=sys.stderr)
    configs = [BenchConfig(m, b, p, modes[b], batch_sizes, base, style)
               for m in models for p in precisions for b, style in series]
    return resolve_executions(args, configs, dataset), phases


def resolve_executions(args: argparse.Namespace, configs: list[BenchConfig], dataset) -> list[BenchConfig]:
    """Each sweep's execution configuration: --mode auto takes a cached search result, searched at the
    sweep's middle batch size, and searches only with --retune (a sweep is too short to pay for one).
    A fit sweep takes its backend's configuration (the search measures the custom step)."""
    from dataclasses import replace

    from compare.tune_resolve import Resolver

    resolver = Resolver(dataset, retune=args.retune, budget_s=args.tune_budget_s)
    specs = []
    for config in configs:
        batch = sorted(config.batch_sizes)[(len(config.batch_sizes) - 1) // 2]
        specs.append(replace(config.base, model=config.model, backend=config.backend, precision=config.precision,
                             mode=config.mode, recipe=replace(config.base.recipe, batch_size=batch)))
    resolver.plan(specs)
    resolved = []
    for config, spec in zip(configs, specs):
        execution = resolver.resolve_one(spec).execution
        print(f"execution {series_name(config.backend, config.style)} / {config.model}: {execution.label()} "
              f"({execution.source})", file=sys.stderr, flush=True)
        resolved.append(replace(config, execution=execution))
    return resolved


def main(args: argparse.Namespace) -> int:
    import pandas as pd

    configs, phases = build_configs(args)
    rows: list[dict] = []
    for config in configs:
        print(f"bench {config.model} / {config.backend} / {config.precision} / {config.mode} / {config.style}: "
              f"batch sizes {','.join(map(str, config.batch_sizes))}", file=sys.stderr, flush=True)
        rows += sweep(config, args.steps, phases, args.timeout)
    frame = pd.DataFrame(rows).reindex(columns=COLUMNS)
    if args.out:
        write_file_atomic(args.out, frame.to_csv(index=False).encode("utf-8"))
    if args.json:
        print(json.dumps(json.loads(frame.to_json(orient="records")), indent=2))
        return 0 if all(r.get("status") in ("ok", "oom") for r in rows) else 1
    shown = frame.drop(columns=["images_per_sec_ci", "error", "retry_of", "fallbacks"]).copy()
    shown["host_peak_rss_mib"] = shown.pop("host_peak_rss_bytes") / 2**20
    shown["host_data_mib"] = shown.pop("host_data_bytes") / 2**20  # the dataset's share of the RSS
    device_measured = shown["device_peak_bytes"].notna()
    for column in ("device_peak_bytes", "device_data_bytes"):
        shown[column.replace("_bytes", "_mib")] = [f"{v / 2**20:.0f}" if measured and not pd.isna(v) else "n/a"
                                                   for v, measured in zip(shown.pop(column), device_measured)]
    shown = shown.astype(object).where(shown.notna(), "")  # blank, not "nan", where not measured
    print(shown.to_markdown(index=False, floatfmt=".4g"))
    ratios = fit_ratio_rows(rows)
    if ratios:
        print("\nThe cost of the idiom: Keras fit over the custom step (training images/s, same backend and mode)")
        print(pd.DataFrame(ratios).to_markdown(index=False, floatfmt=".4g"))
    for (model, backend, precision), largest in largest_fitting_batch(rows).items():
        print(f"largest batch that fits: {model} / {backend} / {precision}: {largest}")
    for note in dict.fromkeys(f"{r['model']} / {r['backend']}: {r['fallbacks']}" for r in rows
                              if r.get("fallbacks") not in (None, "none")):
        print(f"note: could not apply everything as asked: {note}")  # never a silent fallback
    failed = [r for r in rows if r.get("status") not in ("ok", "oom")]
    for row in failed:
        print(f"failed: {row['model']} / {row['backend']} / batch {row['batch_size']}: {row.get('error')}",
              file=sys.stderr)
    return 1 if failed else 0
