"""What torch.compile should cover in dualbench's torch training step: the model alone, or model + loss + argmax.

In ONE process (the choice is a few percent to a few tens of percent, less than
one process's figure moves from one process to the next on a shared machine),
two copies of torch_impl's real ``TrainStep`` in compile mode, built from the
same initial weights on the real pipeline (common.tuning's candidate set-up),
timed alternately in ABBA blocks:

* ``model``: what dualbench runs: ``torch.compile(model)``; loss, argmax and
  the optimizer eager (as a hand-written torch.compile loop does);
* ``model+loss+argmax``: the step's whole forward function compiled into one
  graph (dualbench's step before issue 12's sitting showed the difference).

    .venv/bin/python benchmarks/compile_region.py --models resnet20 --data folder:../shared/datasets/cifar10-jpeg
"""
from __future__ import annotations

import statistics
import sys
from dataclasses import replace

from _common import base_parser, machine_header, print_table, split, write_results
from common.config import Recipe, RunSpec
from common.execution import ExecutionConfig

REGIONS = ("model", "model+loss+argmax")


def build(model: str, data: str, batch_size: int, region: str) -> dict:
    """One candidate set-up (common.tuning) in compile mode, channels_last, with ``region`` compiled."""
    import torch

    from common import tuning
    from common.registry import get_backend

    spec = RunSpec(model=model, backend="torch", data=data, device="cpu", train_subset=batch_size * 64,
                   test_subset=batch_size, recipe=Recipe(batch_size=batch_size, eval_batch_size=batch_size, dropout=0.0),
                   execution=ExecutionConfig("compile", channels_last=True, malloc_tuning=False))
    if region == "model":
        return tuning.prepare_candidate(get_backend("torch"), spec, gate_steps=2)
    eager = replace(spec, execution=spec.execution.replace(mode="eager"))
    state = tuning.prepare_candidate(get_backend("torch"), eager, 1)
    step = state["train_step"]
    step._model_forward = step.forward_model  # inside the compiled graph: the model, eager ...
    step._forward_loss = torch.compile(step._forward_loss, dynamic=False)  # ... compiled with loss and argmax
    tuning.warm_steps(state, 1)
    return state


def measure(model: str, data: str, batch_size: int, rounds: int, steps: int) -> list[dict]:
    from common import tuning

    states = {region: build(model, data, batch_size, region) for region in REGIONS}
    rows = []
    for round_index in range(rounds):
        for region in (REGIONS if round_index % 2 == 0 else REGIONS[::-1]):
            tuning.warm_steps(states[region], 1)
            timed, _ = tuning.timed_steps(states[region], steps)
            rows.append({"model": model, "round": round_index + 1, "region": region, "batch_size": batch_size,
                         "images_per_sec": batch_size / statistics.median(timed), "step_times_s": timed})
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Per model: each region's images/s over all its timed steps, their ratio, and rounds won."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        per = {region: [r for r in rows if r["model"] == model and r["region"] == region] for region in REGIONS}
        speed = {region: per[region][0]["batch_size"] / statistics.median(t for r in per[region] for t in r["step_times_s"])
                 for region in REGIONS}
        wins = sum(a["images_per_sec"] > b["images_per_sec"] for a, b in zip(per["model"], per["model+loss+argmax"]))
        out.append({"model": model, "model_img_s": speed["model"], "whole_img_s": speed["model+loss+argmax"],
                    "model_over_whole": speed["model"] / speed["model+loss+argmax"],
                    "rounds_model_faster": f"{wins}/{len(per['model'])}"})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__, "compile_region.csv")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=6, help="ABBA rounds (even)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per block")
    parser.add_argument("--data", default="synthetic:5000,500", help="dataset SPEC (default %(default)s)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.rounds, args.steps, args.data = 16, 2, 2, "synthetic:512,64"
    rows = []
    for model in split(args.models):
        rows += measure(model, args.data, args.batch_size, args.rounds, args.steps)
    summary = summarise(rows)
    print(machine_header(args.threads))
    print_table("torch.compile region, training images/s (median of every timed step, one process, ABBA)",
                summary, list(summary[0]))
    write_results(args.out, summary, [{k: v for k, v in r.items() if k != "step_times_s"} for r in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
