"""Every torch CUDA path dualbench uses, exercised in one command, with one table of results (torch only).

    python benchmarks/gpu_check.py --data folder:shared/datasets/cifar10-jpeg --budget-s 330
    python benchmarks/gpu_check.py --device cpu --quick          # the smoke run the tests do

Each check is one real dualbench training run (``common.worker.run_training``,
i.e. ``common.loop.train`` with the torch backend) in its own process, with
``common.loop``'s clock replaced by a probe that counts every clock read taken
while the CUDA stream still had queued work (there must be none: the loop
synchronizes before every read). Per check, what it exercises and what must
hold (on a CPU the device-only conditions read "n/a"):

* ``fp32_eager``: device-resident data (the padded dataset on the GPU:
  ``data_residency`` says "device"), synchronize before every clock read, the
  device allocator peak (measured, above the dataset's own bytes);
* ``amp_bf16``: autocast bfloat16 (precision read back from the built step);
* ``amp_fp16``: autocast float16 with GradScaler (dynamic loss scaling read back);
* ``compile_channels_last``: torch.compile (inductor) with channels_last tensors;
* ``resnet18``: resnet18 trained for ``--epochs`` full epochs on ``--data`` in
  ``--mode best`` (on CUDA: compile + channels_last); with ``--quick``, a few steps.

The data is decoded and cached by this process before any torch import (a
process that has torch loaded decodes JPEGs serially). ``--budget-s`` bounds the
whole command: a check that cannot start in time is skipped, a running one is
stopped at the deadline (its finished epochs are still reported), and the table
and files are always written. Imports nothing but the project, numpy and torch
(no TensorFlow, pandas or tqdm), so it runs where only torch is installed.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runs as `python benchmarks/gpu_check.py` from anywhere

from common.config import Recipe, RunSpec  # noqa: E402
from common.results import write_bytes_atomic, write_json_atomic  # noqa: E402
from compare.process import run_process, stderr_tail, worker_env  # noqa: E402

MIB = 2 ** 20
START_MIN_S = 15.0  # a check needs at least this much budget left to start (process start + CUDA init)
SHARED_JPEGS = ("shared/datasets/cifar10-jpeg", "../shared/datasets/cifar10-jpeg")  # from the project root
COLUMNS = ["check", "status", "model", "mode", "precision", "data_on", "train_img_s", "pipeline_img_s",
           "step_ms_p50", "compile_s", "device_peak_mib", "device_data_mib", "device_peak_less_data_mib",
           "host_rss_mib", "test_acc_pct", "epochs", "clock_reads", "unsynced_clock_reads", "wall_s", "notes"]


@dataclass(frozen=True)
class Check:
    """One run: its name, what it exercises, and the spec fields it sets."""

    name: str
    exercises: str
    fields: dict[str, Any] = field(default_factory=dict)  # RunSpec overrides (model, mode, precision...)
    full_run: bool = False  # whole epochs on --data (the resnet18 run), else a capped short run


CHECKS = (
    Check("fp32_eager", "device-resident data, synchronize before every clock read, device memory peak",
          {"mode": "eager", "precision": "fp32", "channels_last": False}),
    Check("amp_bf16", "autocast bfloat16", {"mode": "eager", "precision": "bf16"}),
    Check("amp_fp16", "autocast float16 + GradScaler", {"mode": "eager", "precision": "fp16"}),
    Check("compile_channels_last", "torch.compile (inductor) + channels_last",
          {"mode": "compile", "channels_last": True, "precision": "fp32"}),
    Check("resnet18", "resnet18 training run on --data, --mode best", {"model": "resnet18", "mode": "best"},
          full_run=True),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default %(default)s)")
    parser.add_argument("--data", default=None, help="dataset SPEC (default: the shared CIFAR-10 JPEGs; "
                                                     "--quick: synthetic:64,16)")
    parser.add_argument("--model", default="resnet20", help="model of the short checks (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the resnet18 run (default %(default)s)")
    parser.add_argument("--precision", default="fp32", help="precision of the resnet18 run (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch (default %(default)s)")
    parser.add_argument("--steps", type=int, default=40, help="steps of each short check (default %(default)s)")
    parser.add_argument("--budget-s", type=float, default=330.0,
                        help="wall-clock budget of the whole command, data preparation included (default "
                             "%(default)s)")
    parser.add_argument("--only", default=",".join(c.name for c in CHECKS), help="comma list of checks")
    parser.add_argument("--quick", action="store_true", help="smoke run: small data, a few steps per check")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.csv"),
                        help="CSV to write; a JSON of the same name beside it (default %(default)s)")
    parser.add_argument("--child", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return args  # one check's process: its spec file says everything
    if args.quick:
        args.data = args.data or "synthetic:64,16"
        # compile step + 1 warm-up + 1 timed step of 4 images: CPU fp16 kernels are slow, inductor compiles
        args.model, args.batch_size, args.steps, args.epochs = "seed_cnn", 4, 3, 1
    if args.data is None:
        found = [ROOT / p for p in SHARED_JPEGS if (ROOT / p).is_dir()]
        if not found:
            parser.error(f"no CIFAR-10 JPEGs at {' or '.join(SHARED_JPEGS)}: pass --data folder:PATH")
        args.data = f"folder:{found[0]}"
    kind, _, path = args.data.partition(":")
    if kind == "folder" and path:  # every check's process reads the same absolute path (and cache entry)
        args.data = f"folder:{Path(path).expanduser().resolve()}"
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - {c.name for c in CHECKS})
    if unknown:
        parser.error(f"unknown check(s) {', '.join(unknown)}; choose from {', '.join(c.name for c in CHECKS)}")
    args.checks = [c for c in CHECKS if c.name in names]
    return args


def spec_for(check: Check, args: argparse.Namespace) -> RunSpec:
    """The RunSpec of one check: short checks capped at ``--steps`` steps on a test subset."""
    fields = {"model": args.model, **check.fields}
    warmup = max(1, args.steps // 4)
    if check.full_run:
        fields.setdefault("precision", args.precision)
        recipe = Recipe(epochs=args.epochs, batch_size=args.batch_size)
        cap = args.steps if args.quick else None
        return RunSpec(backend="torch", data=args.data, device=args.device, warmup_steps=warmup,
                       max_steps_per_epoch=cap, recipe=recipe, **fields)
    recipe = Recipe(epochs=1, batch_size=args.batch_size)
    return RunSpec(backend="torch", data=args.data, device=args.device, warmup_steps=warmup,
                   max_steps_per_epoch=args.steps, test_subset=None if args.quick else 2000, recipe=recipe,
                   **fields)


class _ClockProbe:
    """Stands in for common.loop's ``time`` module: counts clock reads, and those taken with work queued."""

    def __init__(self, device: str):
        import torch

        self.reads = self.unsynced = 0
        self._perf_counter = time.perf_counter
        if device.startswith("cuda") and torch.cuda.is_available():
            stream = torch.cuda.current_stream(torch.device(device))
            self._busy = lambda: not stream.query()  # query() only asks; it does not wait
        else:
            self._busy = lambda: False  # a CPU has no queue: every op has finished when it returns

    def perf_counter(self) -> float:
        self.reads += 1
        if self._busy():
            self.unsynced += 1
        return self._perf_counter()


def child_main(spec_path: str, out_path: str) -> int:
    """One check's process: the worker's training task with common.loop's clock probed."""
    import common.loop
    from common.worker import run_training

    spec = json.loads(Path(spec_path).read_text())
    probe = _ClockProbe(spec["device"])
    common.loop.time = probe  # the loop reads time.perf_counter at call time
    code = run_training("torch", spec_path, out_path)
    result = json.loads(Path(out_path).read_text())
    result.update(clock_reads=probe.reads, unsynced_clock_reads=probe.unsynced)
    write_json_atomic(out_path, result)
    return code


def problems(check: Check, spec: RunSpec, result: dict[str, Any], on_cuda: bool) -> list[str]:
    """What does not hold for this check's result (empty: the check passed)."""
    found = []
    if result.get("status") != "ok":
        return [f"status {result.get('status')}: {result.get('error')}"]
    settings = result.get("settings") or {}
    if not result.get("clock_reads") or result.get("unsynced_clock_reads"):
        found.append(f"{result.get('unsynced_clock_reads')} of {result.get('clock_reads')} clock reads "
                     "with device work queued")
    if settings.get("precision") != spec.precision:
        found.append(f"precision read back {settings.get('precision')}, asked {spec.precision}")
    if spec.precision == "fp16" and not str(settings.get("loss_scaling") or "").startswith("dynamic"):
        found.append(f"fp16 without GradScaler (loss_scaling {settings.get('loss_scaling')})")
    if spec.mode == "compile" and (settings.get("execution_mode") != "compile"
                                   or settings.get("data_format") != "NCHW channels_last"):
        found.append(f"asked compile + channels_last, built {settings.get('execution_mode')} "
                     f"{settings.get('data_format')}")
    peak, data = result.get("device_peak_bytes"), result.get("device_data_bytes")
    if on_cuda and (result.get("train_data_on") != "device" or not data or peak is None or peak <= data):
        found.append(f"device data {result.get('train_data_on')} {data} B, device peak {peak} B")
    if not on_cuda and (result.get("train_data_on") != "host" or peak is not None):
        found.append(f"CPU run with data on {result.get('train_data_on')}, device peak {peak}")
    if check.full_run and len(result.get("epochs") or []) != spec.recipe.epochs:
        found.append(f"{len(result.get('epochs') or [])} of {spec.recipe.epochs} epochs")
    return found


def _mib(value: Any) -> float | None:
    return value / MIB if isinstance(value, (int, float)) else None


def row_for(check: Check, spec: RunSpec, result: dict[str, Any], outcome: Any, on_cuda: bool) -> dict[str, Any]:
    """One table row from a check's RunResult (or, when it was stopped, from its epoch events)."""
    epochs = result.get("epochs") or [e for e in outcome.events if e.get("event") == "epoch"]
    accuracy = result.get("test_accuracy") or (epochs[-1].get("test_accuracy") if epochs else None)
    peak, data = result.get("device_peak_bytes"), result.get("device_data_bytes")
    step = result.get("step_time_p50_s")
    if outcome.timed_out:
        status, notes = "stopped", f"--budget-s reached after {len(epochs)} epoch(s)"
    else:
        issues = problems(check, spec, result, on_cuda)
        status, notes = ("FAIL", "; ".join(issues)) if issues else ("ok", check.exercises)
    return {"check": check.name, "status": status, "model": spec.model, "mode": spec.mode,
            "precision": spec.precision, "data_on": result.get("train_data_on"),
            "train_img_s": result.get("train_images_per_sec"),
            "pipeline_img_s": result.get("pipeline_images_per_sec"),
            "step_ms_p50": 1000 * step if step else None, "compile_s": result.get("compile_s"),
            "device_peak_mib": _mib(peak), "device_data_mib": _mib(data) if peak is not None else None,
            "device_peak_less_data_mib": _mib(peak - data) if peak is not None and data is not None else None,
            "host_rss_mib": _mib(outcome.host_peak_rss_bytes),
            "test_acc_pct": 100 * accuracy if accuracy is not None else None, "epochs": len(epochs),
            "clock_reads": result.get("clock_reads"), "unsynced_clock_reads": result.get("unsynced_clock_reads"),
            "wall_s": outcome.wall_s, "notes": notes}


def run_check(check: Check, args: argparse.Namespace, timeout_s: float, workdir: Path,
              on_cuda: bool) -> dict[str, Any]:
    """One check in its own process (killed at ``timeout_s``); its table row."""
    spec = spec_for(check, args)
    spec_path, out_path = workdir / f"{check.name}.spec.json", workdir / f"{check.name}.out.json"
    spec_path.write_text(spec.to_json())
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path), str(out_path)]
    log = workdir / f"{check.name}.stderr.log"
    outcome = run_process(argv, log_path=log, timeout_s=timeout_s, env=worker_env())
    if outcome.interrupted:
        raise KeyboardInterrupt
    result = json.loads(out_path.read_text()) if out_path.exists() else {}
    if not result and not outcome.timed_out:
        tail = stderr_tail(log).strip().splitlines()
        result = {"status": "crashed", "error": f"exit {outcome.returncode}: {tail[-1] if tail else ''}"[:300]}
    return row_for(check, spec, result, outcome, on_cuda)


def environment(device: str) -> dict[str, str]:
    """torch, CUDA and GPU names for the header (torch is imported only now, after the data is cached)."""
    import torch

    info = {"torch": torch.__version__, "cuda": str(torch.version.cuda), "device": device}
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit(f"gpu_check: --device {device} but torch sees no CUDA device: "
                             "use --device cpu --quick (or run on a GPU machine)")
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def print_table(rows: list[dict[str, Any]]) -> None:
    """The rows as a Markdown table (not benchmarks/_common's: it imports compare.store, i.e. pandas)."""
    def cell(value: Any) -> str:
        return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

    body = [[cell(r.get(c)) for c in COLUMNS] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in body]) for i, c in enumerate(COLUMNS)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in body:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |")


def write_outputs(out: Path, rows: list[dict[str, Any]], info: dict[str, str], argv: list[str]) -> None:
    """The table as CSV, and beside it a JSON with the exact command, the time, the machine and the rows."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(out, text.getvalue().encode("utf-8"))
    command = shlex.join(["python", Path(__file__).resolve().relative_to(ROOT).as_posix(), *argv])
    finished = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    write_json_atomic(out.with_suffix(".json"), {"command": command, "finished_utc": finished, **info,
                                                 "rows": rows})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(*args.child)
    started = time.monotonic()
    deadline = started + args.budget_s
    from common.data import load_dataset  # decoded and cached here, before torch is imported

    print(f"gpu_check: preparing {args.data} ...", flush=True)
    dataset = load_dataset(args.data, progress=False)
    print(f"gpu_check: {dataset!r} ready in {time.monotonic() - started:.0f} s", flush=True)
    info = environment(args.device)
    on_cuda = args.device.startswith("cuda")
    print(f"gpu_check: torch {info['torch']} (CUDA {info['cuda']}), device {info.get('gpu', args.device)}, "
          f"budget {args.budget_s:.0f} s", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dualbench-gpu-check-") as tmp:
        for check in args.checks:
            left = deadline - time.monotonic()
            if left < START_MIN_S:
                rows.append({"check": check.name, "status": "skipped",
                             "notes": f"--budget-s: {max(left, 0):.0f} s left"})
                continue
            print(f"gpu_check: {check.name} ({check.exercises}) ...", flush=True)
            rows.append(run_check(check, args, left, Path(tmp), on_cuda))
            print(f"gpu_check: {check.name}: {rows[-1]['status']} in {rows[-1]['wall_s']:.0f} s", flush=True)
    info["total_s"] = f"{time.monotonic() - started:.0f}"
    print()
    print_table(rows)
    write_outputs(Path(args.out), rows, info, sys.argv[1:] if argv is None else argv)
    print(f"\nwrote {args.out} and {Path(args.out).with_suffix('.json')}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
