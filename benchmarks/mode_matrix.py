"""The execution-mode matrix per framework: the evidence behind the fallback mode (``--mode best``).

torch: eager / compile x channels_last on / off; TensorFlow: eager / graph /
xla; keras-torch (Keras 3 on PyTorch): eager / jit_compile; each in fp32 and
bf16 (bf16 where it runs on this CPU; a failure is recorded, not fatal). The
Keras backends run every mode in both styles, the custom step and Keras's
``fit`` (``--style custom,fit``: one process per style), and the matrix gives
fit over custom per mode (the cost of the idiom; ``--no-fit`` leaves it out). Every configuration is one ``dualbench bench --json``
call (phase train; one measurement process per model), so the numbers are
dualbench's own compute-only training images/s (median of per-step figures,
compile step and warm-up excluded) plus the compile step's seconds.
Configurations alternate torch / TensorFlow within a round; each further
round runs the sequence in reverse (ABBA) and medians are reported.

The winner per (framework, model, precision) is compared with the fixed
fallback (``FALLBACK_MODE`` in torch_impl/backend.py and tf_impl/backend.py,
with common.execution.FALLBACK's memory format, read in a subprocess), which
``--mode best`` and runs without a search use; ``--mode auto`` measures the
choice on each machine instead (compare.tune, benchmarks/tune_check.py).
Inductor caches compiled code on disk, so torch compile_s is a warm-cache
figure after the first run on a machine.

    .venv/bin/python benchmarks/mode_matrix.py            # ~10+ minutes on 2 cores
    .venv/bin/python benchmarks/mode_matrix.py --backends torch,tensorflow,keras-torch --precisions fp32
    .venv/bin/python benchmarks/mode_matrix.py --quick
"""
from __future__ import annotations

import itertools
import sys

from _common import (abba, base_parser, dualbench_bench, machine_header, median, print_table, run_json, split,
                     write_results)

TORCH_CONFIGS = [("eager", "on"), ("eager", "off"), ("compile", "on"), ("compile", "off")]
TF_MODES = ["graph", "xla", "eager"]
KERAS_TORCH_MODES = ["eager", "jit_compile"]
KERAS_BACKENDS = ("tensorflow", "keras-torch")  # the backends with Keras's fit style
FALLBACK_PROBES = {
    "torch": "import json, torch; from torch_impl.backend import FALLBACK_MODE; "
             "from common.execution import FALLBACK; cl = FALLBACK['torch'].channels_last; "
             "d = 'cuda' if torch.cuda.is_available() else 'cpu'; m = FALLBACK_MODE[d]; "
             "print(json.dumps({'device': d, 'config': f\"{m} cl={'on' if cl else 'off'}\"}))",
    "tensorflow": "import json, tensorflow as tf; from tf_impl.backend import FALLBACK_MODE; "
                  "d = 'gpu' if tf.config.list_physical_devices('GPU') else 'cpu'; "
                  "print(json.dumps({'device': d, 'config': FALLBACK_MODE[d]}))",
    "keras-torch": "import json, kerastorch_impl, torch; from kerastorch_impl.backend import FALLBACK_MODE; "
                   "d = 'cuda' if torch.cuda.is_available() else 'cpu'; "
                   "print(json.dumps({'device': d, 'config': FALLBACK_MODE[d]}))",
}


def configurations(backends: list[str], precisions: list[str],
                   torch_configs: list[tuple[str, str]] | None = None) -> list[tuple[str, str, str | None, str]]:
    """(backend, mode, channels_last or None, precision), the backends interleaved; torch's
    ``torch_configs`` ((mode, channels_last) pairs; default all of TORCH_CONFIGS)."""
    per_backend = {"torch": [("torch", m, cl, p) for p in precisions for m, cl in torch_configs or TORCH_CONFIGS],
                   "tensorflow": [("tensorflow", m, None, p) for p in precisions for m in TF_MODES],
                   "keras-torch": [("keras-torch", m, None, p) for p in precisions for m in KERAS_TORCH_MODES]}
    lists = [per_backend[b] for b in backends]
    return [c for group in itertools.zip_longest(*lists) for c in group if c is not None]


def label(mode: str, channels_last: str | None, style: str = "custom") -> str:
    text = mode if channels_last is None else f"{mode} cl={channels_last}"
    return text if style == "custom" else f"{text} {style}"


def run_config(config, args) -> list[dict]:
    backend, mode, channels_last, precision = config
    bench_args = ["--models", args.models, "--backends", backend, "--mode", mode, "--precision", precision,
                  "--batch-size", str(args.batch_size), "--phases", "train", "--steps", str(args.steps),
                  "--measure-warmup-steps", str(args.warmup)]
    if channels_last is not None:
        bench_args += ["--channels-last", channels_last]
    if args.threads:
        bench_args += ["--threads", str(args.threads)]
    if args.fit and backend in KERAS_BACKENDS:
        bench_args += ["--style", "custom,fit"]
    rows = dualbench_bench(bench_args, f"bench-{backend}-{mode}-{precision}")
    found = [r for r in rows if r.get("measure") in ("compute", None)]  # failed configs have no measure
    return [{"config": label(mode, channels_last, r.get("style") or "custom"), **r} for r in found] or [
        {"config": label(mode, channels_last), "backend": backend, "precision": precision, "status": "no rows"}]


def summarise(rows: list[dict], fallbacks: dict[str, dict]) -> list[dict]:
    """Per (backend, model, precision, config): median images/s and compile_s; the winner marked."""
    out = []
    names = [label(m, cl) for m, cl in TORCH_CONFIGS] + [
        label(m, None, style) for m in dict.fromkeys(TF_MODES + KERAS_TORCH_MODES) for style in ("custom", "fit")]
    order = {c: i for i, c in enumerate(names)}
    keys = sorted(dict.fromkeys((r["backend"], r.get("model"), r["precision"], r["config"]) for r in rows),
                  key=lambda k: (k[0] != "torch", k[2] != "fp32", k[2], str(k[1]), order.get(k[3], 99)))
    for backend, model, precision, config in keys:
        mine = [r for r in rows if (r["backend"], r.get("model"), r["precision"], r["config"]) ==
                (backend, model, precision, config)]
        ok = [r for r in mine if r.get("status") == "ok"]
        out.append({"backend": backend, "model": model, "precision": precision, "config": config,
                    "batch_size": mine[0].get("batch_size"),
                    "train_img_s": median(r.get("images_per_sec") for r in ok),
                    "compile_s": median(r.get("compile_s") for r in ok), "fastest": "",
                    "fallback": "FALLBACK" if fallbacks.get(backend, {}).get("config") == config else "",
                    "style": mine[0].get("style") or "custom", "fit_over_custom": None,
                    "status": "ok" if ok else str(mine[0].get("error") or mine[0].get("status"))[:80]})
    for row in out:  # the idiom's cost: fit over the custom step, same backend, mode, model and precision
        if row["style"] == "fit" and row["train_img_s"]:
            custom = next((r for r in out if r["style"] == "custom" and r["train_img_s"] and
                           (r["backend"], r["model"], r["precision"], label(r["config"], None, "fit")) ==
                           (row["backend"], row["model"], row["precision"], row["config"])), None)
            if custom:
                row["fit_over_custom"] = row["train_img_s"] / custom["train_img_s"]
    for group in dict.fromkeys((r["backend"], r["model"], r["precision"]) for r in out):
        members = [r for r in out if (r["backend"], r["model"], r["precision"]) == group and r["train_img_s"]
                   and r["style"] == "custom"]
        if members:
            max(members, key=lambda r: r["train_img_s"])["fastest"] = "fastest"
    return out


def verdicts(summary: list[dict], fallbacks: dict[str, dict]) -> list[str]:
    """One line per (backend, model, precision): which configuration won and whether the fallback agrees."""
    lines = []
    for row in (r for r in summary if r["fastest"]):
        chosen = fallbacks.get(row["backend"], {}).get("config")
        mine = next((r for r in summary if r["fallback"] and (r["backend"], r["model"], r["precision"]) ==
                     (row["backend"], row["model"], row["precision"])), None)
        gap = ""
        if mine and mine["train_img_s"]:
            gap = f", the fallback {1 - mine['train_img_s'] / row['train_img_s']:.1%} slower"
        agrees = "matches the fallback" if chosen == row["config"] else f"differs from the fallback ({chosen}{gap})"
        lines.append(f"{row['backend']} {row['model']} {row['precision']}: fastest {row['config']} "
                     f"({row['train_img_s']:.0f} img/s) - {agrees}")
    lines += [f"{r['backend']} {r['model']} {r['precision']} {r['config']}: fit over custom "
              f"{r['fit_over_custom']:.2f}" for r in summary if r["fit_over_custom"]]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__, "mode_matrix.csv")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma list (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measure (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after the compile step")
    parser.add_argument("--rounds", type=int, default=2,
                        help="repeats of the interleaved sequence, even for a balanced order")
    parser.add_argument("--no-fit", dest="fit", action="store_false",
                        help="Keras backends: the custom step only (default: also Keras's fit, and fit over custom)")
    parser.add_argument("--torch-configs", default=None, metavar="MODE:CL,...",
                        help="torch's configurations, e.g. eager:on,compile:on (default: "
                             + ",".join(f"{m}:{cl}" for m, cl in TORCH_CONFIGS) + ")")
    args = parser.parse_args(argv)
    torch_configs = [tuple(item.split(":")) for item in split(args.torch_configs)] if args.torch_configs else None
    if torch_configs and not set(torch_configs) <= set(TORCH_CONFIGS):
        parser.error(f"--torch-configs: each of {', '.join(f'{m}:{cl}' for m, cl in TORCH_CONFIGS)}")
    if args.quick:
        args.batch_size, args.steps, args.warmup, args.rounds = 16, 2, 1, 1
        args.models = split(args.models)[0]
    backends = split(args.backends)
    fallbacks = {b: run_json([sys.executable, "-c", FALLBACK_PROBES[b]], f"fallback-{b}")[0] or {} for b in backends}
    rows = []
    configs = configurations(backends, split(args.precisions), torch_configs)
    for round_index, config in abba(configs, args.rounds):
        print(f"round {round_index + 1}/{args.rounds}: {config}", file=sys.stderr, flush=True)
        rows += [{"round": round_index + 1, **r} for r in run_config(config, args)]
    summary = summarise(rows, fallbacks)
    print(machine_header(args.threads))
    print_table(f"compute-only training images/s, {args.steps} timed steps, median of {args.rounds} round(s)",
                summary, list(summary[0]) if summary else [])
    print("\nthe fallback in the backends: " + "; ".join(f"{b}: {v.get('config')} on {v.get('device')}"
                                                 for b, v in fallbacks.items()))
    print("\n".join(verdicts(summary, fallbacks)))
    write_results(args.out, summary, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
