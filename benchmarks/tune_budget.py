"""What `dualbench tune` costs with empty caches, and whether it chooses the same twice.

The search (`--mode auto`, compare/tune.py) must stay under 5 minutes for 2
models x 2 frameworks on a 2-core CPU, and should choose the same
configurations when run again. Each of ``--repeats`` rounds runs
``dualbench tune --json`` for ``--models`` x torch, TensorFlow with its own
empty ``DUALBENCH_TUNING_CACHE`` and ``TORCHINDUCTOR_CACHE_DIR`` (what a
new user's first run pays: every compile is cold) and records:

* ``command_s``: the command's wall time (dataset load included);
* per search: ``elapsed_s``, its share of the budget, whether it was complete
  (candidates the budget skipped), candidates measured, and the choice; the
  raw CSV also holds each search's table (every candidate's figures, status
  and why it was excluded).

The summary gives, per round, the command's seconds and the sum of the
searches' against ``--limit-s`` (300), and per (model, backend) whether every
round chose the same configuration. Run it with nothing else running:

    .venv/bin/python benchmarks/tune_budget.py --data folder:../shared/datasets/cifar10-jpeg
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from _common import base_parser, dualbench_cli, machine_header, print_table, split, write_results

LIMIT_S = 300.0  # issue 12: 2 models x 2 backends under 5 minutes on a 2-core CPU


def one_round(args, round_index: int) -> list[dict]:
    """``dualbench tune`` with empty caches; one row per search."""
    with tempfile.TemporaryDirectory(prefix="dualbench-tune-budget-") as tmp:
        saved = {k: os.environ.get(k) for k in ("DUALBENCH_TUNING_CACHE", "TORCHINDUCTOR_CACHE_DIR")}
        os.environ["DUALBENCH_TUNING_CACHE"] = os.path.join(tmp, "tuning")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tmp, "inductor")
        try:
            started = time.perf_counter()
            done = dualbench_cli(["tune", "--models", args.models, "--backends", args.backends, "--data", args.data,
                                  "--batch-size", str(args.batch_size), "--json"] + (["--quick"] if args.quick else []),
                                 "dualbench tune")
            command_s = time.perf_counter() - started
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    if done is None or done.returncode != 0:
        tail = (done.stderr.strip().splitlines() if done else ["timed out"]) or [""]
        print(f"  round {round_index + 1}: dualbench tune failed: {tail[-1]}", file=sys.stderr)
        return [{"round": round_index + 1, "kind": "search", "status": "failed", "command_s": round(command_s, 1)}]
    records = json.loads(done.stdout[done.stdout.find("["):])
    rows, tables = [], []
    for record in records:
        search = record.get("search") or {}
        statuses = [row.get("status") for row in search.get("rows", [])]
        rows.append({"round": round_index + 1, "kind": "search", "status": "ok", "model": record["model"],
                     "backend": record["backend"],
                     "choice": record["label"], "how": record["how"], "elapsed_s": search.get("elapsed_s"),
                     "share_s": round(search["budget_s"], 1) if search.get("budget_s") is not None else None,
                     "complete": search.get("complete"), "measured": sum(s not in ("skipped", "pending") for s in statuses),
                     "skipped": statuses.count("skipped"), "command_s": round(command_s, 1)})
        # the search's own table (every candidate: figures, status, why excluded), for reading a choice
        tables += [{"round": round_index + 1, "kind": "candidate", "model": record["model"],
                    "backend": record["backend"], **candidate} for candidate in search.get("rows", [])]
    return rows + tables


def summarise(rows: list[dict], limit_s: float = LIMIT_S) -> list[dict]:
    """Per round: the command's and the searches' seconds against the limit; then per (model, backend): the
    choices of every round and whether they are all the same."""
    out = []
    rows = [r for r in rows if r.get("kind") != "candidate"]  # the search tables ride along in the raw CSV
    for round_index in sorted({r["round"] for r in rows}):
        mine = [r for r in rows if r["round"] == round_index]
        searches = sum(r.get("elapsed_s") or 0.0 for r in mine)
        failed = any(r["status"] != "ok" for r in mine)
        out.append({"what": f"round {round_index}", "command_s": mine[0]["command_s"], "searches_s": round(searches, 1),
                    "limit_s": limit_s, "within": "no" if failed or mine[0]["command_s"] > limit_s else "yes",
                    "incomplete_searches": sum(r.get("complete") is False for r in mine)})
    pairs = dict.fromkeys((r["model"], r["backend"]) for r in rows if r["status"] == "ok")
    for model, backend in pairs:
        choices = [r["choice"] for r in rows if (r.get("model"), r.get("backend")) == (model, backend)]
        out.append({"what": f"{model} / {backend}", "choices": " | ".join(choices),
                    "same_every_round": "yes" if len(set(choices)) == 1 else "no"})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__, "tune_budget.csv")
    parser.add_argument("--data", default="synthetic:5000,500", help="dataset SPEC (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="rounds, each with empty caches (default 2)")
    parser.add_argument("--limit-s", type=float, default=LIMIT_S, help="the budget to check (default %(default)s)")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.data, args.batch_size, args.repeats = split(args.models)[0], "synthetic:512,64", 16, 1
    rows = [row for round_index in range(args.repeats) for row in one_round(args, round_index)]
    summary = summarise(rows, args.limit_s)
    print(machine_header(args.threads))
    print_table("dualbench tune with empty caches: seconds against the limit, and the choices per round", summary,
                ["what", "command_s", "searches_s", "limit_s", "within", "incomplete_searches", "choices",
                 "same_every_round"])
    write_results(args.out, summary, rows)
    return 0 if all(r["status"] == "ok" for r in rows if r["kind"] == "search") else 1


if __name__ == "__main__":
    sys.exit(main())
