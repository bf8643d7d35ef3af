"""The search's choice against an exhaustive measurement of all candidates, in the same sitting.

For each (backend, model): the search of compare.tune runs fresh (not from
the cache) and picks a configuration; then every combination of the chosen
dimensions' values (``--dims``; the others stay at the search's choice) is
measured the same way (compare.tune.run_candidate: own process, gate outputs,
median of timed training steps), all candidates of all pairs interleaved and
each round in reverse order (ABBA), each gated against the reference. The
verdict compares the search's choice with the exhaustive best: the choice's
images/s in this exhaustive sitting over the best correct candidate's
(target >= ``TARGET``), and the search's own time.

    .venv/bin/python benchmarks/tune_check.py                  # ~40+ minutes on 2 cores
    .venv/bin/python benchmarks/tune_check.py --dims all       # every dimension (much longer)
    .venv/bin/python benchmarks/tune_check.py --quick
"""
from __future__ import annotations

import itertools
import sys

from _common import abba, base_parser, machine_header, median, print_table, split, write_results
from common.config import Recipe, RunSpec
from common.data import load_dataset
from common.execution import ExecutionConfig
from common.manifest import usable_cores
from compare.tune import Search, gate_differences, gate_failures, run_candidate, search_space
from compare.tune_resolve import candidate_spec

TARGET = 0.95  # the search's choice / the exhaustive best, images/s
DEFAULT_DIMS = {"torch": ("mode", "channels_last", "malloc_tuning"),
                "tensorflow": ("mode", "onednn", "malloc_tuning")}


def exhaustive(backend: str, choice: ExecutionConfig, dims: str) -> list[ExecutionConfig]:
    """Every combination of the dimensions' values around ``choice`` (the reference's eager mode included)."""
    space = search_space(backend)
    names = [d.field for d in space.dimensions] if dims == "all" else (
        DEFAULT_DIMS.get(backend, ()) if dims == "default" else split(dims))
    values = {}
    for dimension in space.dimensions:
        if dimension.field in names:
            found = [v for v in dimension.values
                     if not (dimension.field == "inter_op_threads" and v is not None and v >= usable_cores())]
            if dimension.field == "mode" and space.reference.mode not in found:
                found.append(space.reference.mode)
            values[dimension.field] = found
    return [choice.replace(source="", **dict(zip(values, combo))) for combo in itertools.product(*values.values())]


def summarise(rows: list[dict], searches: dict) -> list[dict]:
    out = []
    for (backend, model), record in searches.items():
        mine = [r for r in rows if (r["backend"], r["model"]) == (backend, model)]
        by_config: dict[str, list[dict]] = {}
        for row in mine:
            by_config.setdefault(row["candidate"], []).append(row)
        scores = {label: median(r.get("images_per_sec") for r in group) for label, group in by_config.items()
                  if all(r["status"] == "ok" for r in group)}
        best = max(scores, key=lambda k: scores[k] or 0.0) if scores else None
        chosen = record.get("choice_label")
        out.append({"backend": backend, "model": model, "search_choice": chosen,
                    "search_s": record.get("elapsed_s"), "exhaustive_best": best,
                    "best_img_s": scores.get(best), "choice_img_s": scores.get(chosen),
                    "choice_over_best": (scores[chosen] / scores[best]) if scores.get(chosen) and best else None,
                    "candidates": len(by_config), "excluded": sum(1 for k in by_config if k not in scores),
                    "target": f">= {TARGET}"})
        ratio = out[-1]["choice_over_best"]
        out[-1]["meets"] = "yes" if ratio is not None and ratio >= TARGET else "no"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__, "tune_check.csv")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dims", default="default",
                        help="dimensions measured exhaustively: default (the ones with the largest effects), "
                             "all, or a comma list of ExecutionConfig fields")
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds of the exhaustive measurement")
    parser.add_argument("--budget-s", type=float, default=300.0, help="the search's budget per (backend, model)")
    parser.add_argument("--data", default="synthetic:5000,500", help="dataset SPEC (default %(default)s)")
    args = parser.parse_args(argv)
    steps = None
    if args.quick:
        args.batch_size, args.rounds, args.data, steps = 16, 1, "synthetic:256,64", (2, 0, 2)
        args.models = split(args.models)[0]
    dataset = load_dataset(args.data, progress=False)
    bases, searches = {}, {}
    for model, backend in itertools.product(split(args.models), split(args.backends)):
        spec = RunSpec(model=model, backend=backend, data=args.data, threads=args.threads,
                       recipe=Recipe(batch_size=args.batch_size))
        bases[backend, model] = candidate_spec(spec, dataset)
        print(f"search {backend} {model}", file=sys.stderr, flush=True)
        searches[backend, model] = Search(bases[backend, model], budget_s=args.budget_s, quick=args.quick).run()
    pairs = []
    for (backend, model), record in searches.items():
        if record.get("choice"):
            choice = ExecutionConfig.from_dict(record["choice"])
            reference = search_space(backend).reference
            pairs += [((backend, model), config) for config in [reference] + exhaustive(backend, choice, args.dims)]
    pairs = list(dict.fromkeys(pairs))
    rows, references = [], {}
    for round_index, ((backend, model), config) in abba(pairs, args.rounds):
        print(f"round {round_index + 1}/{args.rounds}: {backend} {model} {config.label()}", file=sys.stderr, flush=True)
        kwargs = {"steps": steps} if steps else {}
        result = run_candidate(bases[backend, model], config, **kwargs)
        status = result.get("status")
        gate = result.get("gate") or {}
        if config == search_space(backend).reference and status == "ok":
            references.setdefault((backend, model), gate)
        rows.append({"round": round_index + 1, "backend": backend, "model": model, "candidate": config.label(),
                     "status": status, "images_per_sec": result.get("images_per_sec"), "gate": gate,
                     "error": result.get("error")})
    for row in rows:  # the gate, as the search applies it, against the reference of the same sitting
        reference = references.get((row["backend"], row["model"]))
        if row["status"] == "ok" and reference is not None:
            problems = gate_failures(row["gate"], reference)
            row["status"], row["error"] = ("excluded", "; ".join(problems)) if problems else ("ok", None)
            for name, (diff, scale) in gate_differences(row["gate"], reference).items():  # the evidence for
                row[f"gate {name}"] = diff / scale if scale else diff  # the gate's tolerances
        row.pop("gate")
    summary = summarise(rows, searches)
    print(machine_header(args.threads))
    print_table(f"search choice vs exhaustive best (median of {args.rounds} round(s), batch {args.batch_size})",
                summary, list(summary[0]) if summary else [])
    write_results(args.out, summary, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
