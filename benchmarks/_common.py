"""Shared pieces of the benchmark scripts: machine header, subprocesses with peak RSS, ABBA order, tables, CSV.

Every measurement runs in its own subprocess (never TensorFlow and torch in
one process; thread pools, compile caches and peak RSS are per process),
started with ``compare.process.run_process``, which reaps it with
``os.wait4`` and so returns its host peak RSS (ru_maxrss, KiB -> bytes).
"""
from __future__ import annotations

import argparse
import csv
import io
import datetime
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the scripts run as `python benchmarks/x.py` from anywhere

from common.config import Recipe, RunSpec  # noqa: E402
from common.execution import ExecutionConfig, requested  # noqa: E402
from common.manifest import collect_manifest, usable_cores  # noqa: E402
from common.registry import worker_command  # noqa: E402
from common.results import write_json_atomic  # noqa: E402
from compare.process import ProcessOutcome, run_process, stderr_tail, worker_env  # noqa: E402
from compare.runner import abba  # noqa: E402,F401  (the scripts import it from here)
from compare.store import write_file_atomic  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"
BACKENDS = ("torch", "tensorflow")
MODELS = ("seed_cnn", "resnet20")
SUBPROCESS_TIMEOUT_S = 900.0  # per measurement process; a hung one is killed with its process group


def base_parser(description: str, csv_name: str) -> argparse.ArgumentParser:
    """--models, --backends, --threads, --quick, --out: the options every script shares."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated models (default %(default)s)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated (default %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads for every side (default: all usable cores)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny batch, few steps, one round")
    parser.add_argument("--out", default=str(RESULTS_DIR / csv_name), help="CSV to write (default %(default)s)")
    return parser


def split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def machine_header(threads: int | None) -> str:
    """CPU model, cores, threads used, library versions and git commit, as printed above every table."""
    m = collect_manifest()
    packages = ", ".join(f"{name} {version}" for name, version in m["packages"].items() if name != "dualbench")
    return (f"machine: {m['cpu_model']} | {m['usable_cores']} usable cores ({m['cpu_count']} logical) | "
            f"threads per framework: {threads or usable_cores()}\n"
            f"python {m['python']} | {packages}\n"
            f"{m['os']} | git {m['git_commit']} | {m['created_utc']}")


def median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def run_json(argv: list[str], tag: str, timeout_s: float = SUBPROCESS_TIMEOUT_S,
             env_extra: dict[str, str] | None = None,
             execution: ExecutionConfig | None = None) -> tuple[dict | None, ProcessOutcome]:
    """Run ``argv``; return the last JSON object it printed on stdout (None if none) and the outcome (RSS).

    ``execution``: whose process-level settings (oneDNN, malloc) the process starts with (None: the fallback's).
    """
    with tempfile.TemporaryDirectory(prefix="dualbench-benchmarks-") as tmp:
        log = Path(tmp) / f"{tag}.stderr.log"
        outcome = run_process(argv, log_path=log, timeout_s=timeout_s,
                              env={**_env(execution), **(env_extra or {})})
        if outcome.interrupted:
            raise KeyboardInterrupt
        result = _last_json(outcome.stdout_tail)
        if result is None:
            tail = stderr_tail(log).strip().splitlines()
            print(f"  {tag}: no result (exit {outcome.returncode}): {tail[-1] if tail else ''}", file=sys.stderr)
    return result, outcome


def _env(execution: ExecutionConfig | None = None) -> dict[str, str]:
    env = worker_env(execution)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter stays out of the logs
    return env


def _cli_env() -> dict[str, str]:
    """The environment of a `dualbench` command: the user's as it is (its workers get their configuration's
    process-level settings from the CLI itself; applying a fallback's here, e.g. TF_ENABLE_ONEDNN_OPTS=1,
    would overwrite what the user set, such as an emulated AVX2 CPU's TF_ENABLE_ONEDNN_OPTS=0)."""
    from compare.process import project_env

    env = project_env()
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _last_json(lines: list[str]) -> Any:
    for line in reversed(lines):
        if line.startswith(("{", "[")):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def run_bare(backend: str, model: str, batch_size: int, steps: int, warmup: int, threads: int | None,
             data: str, execution: ExecutionConfig | None = None) -> dict[str, Any]:
    """One bare loop (benchmarks/bare_loops.py) in its own process: images/s, compile_s, peak RSS.

    ``execution``: the loop's mode, memory format and inter-op threads, and the
    process's oneDNN / malloc environment (None: bare_loops.py's defaults, fallback environment).
    """
    argv = [sys.executable, str(ROOT / "benchmarks" / "bare_loops.py"), "--backend", backend, "--model", model,
            "--batch-size", str(batch_size), "--steps", str(steps), "--warmup", str(warmup), "--data", data]
    if threads:
        argv += ["--threads", str(threads)]
    if execution is not None:
        if execution.mode not in ("best", "auto"):
            argv += ["--mode", execution.mode]
        if execution.channels_last is not None:
            argv += ["--channels-last", "on" if execution.channels_last else "off"]
        if execution.inter_op_threads:
            argv += ["--inter-op", str(execution.inter_op_threads)]
    result, outcome = run_json(argv, f"bare-{backend}-{model}", execution=execution)
    result = result or {}
    return {"images_per_sec": result.get("images_per_sec"),
            "step_median_images_per_sec": result.get("step_median_images_per_sec"), "compile_s": result.get("compile_s"),
            "host_peak_rss_bytes": outcome.host_peak_rss_bytes, "process_wall_s": outcome.wall_s,
            "onednn": result.get("onednn"), "status": "ok" if result else f"failed (exit {outcome.returncode})"}


def run_dualbench(backend: str, model: str, batch_size: int, steps: int, warmup: int, threads: int | None,
                  data: str, **spec_overrides: Any) -> dict[str, Any]:
    """One dualbench training run: the backend's worker (common.worker.execute -> common.loop.train).

    One epoch capped at 1 + warmup + steps steps, so the loop's steady-state
    pipeline-inclusive figure covers exactly ``steps`` steps, as the bare
    loop's does. Evaluation batches are the training batch size (the bare
    loop does not evaluate; eval time is outside the loop's training clock).
    """
    recipe = replace(Recipe(), batch_size=batch_size, eval_batch_size=batch_size, epochs=1)
    spec = RunSpec(model=model, backend=backend, data=data, threads=threads, warmup_steps=warmup,
                   max_steps_per_epoch=1 + warmup + steps, recipe=recipe, **spec_overrides)
    with tempfile.TemporaryDirectory(prefix="dualbench-benchmarks-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(spec.to_json())
        argv = [sys.executable, *worker_command(backend), "train", str(spec_path), str(out_path)]
        outcome = run_process(argv, log_path=Path(tmp) / "stderr.log", timeout_s=SUBPROCESS_TIMEOUT_S,
                              env=_env(requested(spec)))
        if outcome.interrupted:
            raise KeyboardInterrupt
        result = json.loads(out_path.read_text()) if out_path.exists() else {}
        if result.get("status") != "ok":
            tail = stderr_tail(Path(tmp) / "stderr.log").strip().splitlines()
            print(f"  dualbench {backend} {model}: {result.get('error') or (tail[-1] if tail else '')}",
                  file=sys.stderr)
    return {"images_per_sec": result.get("pipeline_images_per_sec"),
            "compute_images_per_sec": result.get("train_images_per_sec"), "compile_s": result.get("compile_s"),
            "host_peak_rss_bytes": outcome.host_peak_rss_bytes, "process_wall_s": outcome.wall_s,
            "status": result.get("status") or f"failed (exit {outcome.returncode})"}


def dualbench_cli(args: list[str], tag: str,
                  timeout_s: float = SUBPROCESS_TIMEOUT_S * 4) -> subprocess.CompletedProcess | None:
    """`dualbench ARGS` in a subprocess (output captured); None when it timed out."""
    argv = [sys.executable, "-m", "compare", *args]
    try:
        return subprocess.run(argv, capture_output=True, text=True, env=_cli_env(), cwd=ROOT, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        print(f"  {tag}: timed out", file=sys.stderr)
        return None


def dualbench_bench(args: list[str], tag: str) -> list[dict[str, Any]]:
    """`dualbench bench ... --json` rows (it starts one measurement process per config itself).

    Plain ``subprocess.run``: the measurement rows already carry their own
    process's peak RSS, and the pretty-printed JSON is longer than
    run_process keeps of stdout.
    """
    return json_list(dualbench_cli(["bench", *args, "--json"], tag), tag)


def json_list(done: subprocess.CompletedProcess | None, tag: str) -> list[dict[str, Any]]:
    """The JSON list a `dualbench ... --json` command printed ([] where it timed out or printed none)."""
    if done is None:
        return []
    start = done.stdout.find("[")
    try:
        found = json.loads(done.stdout[start:]) if start >= 0 else []
    except ValueError:
        found = None
    if not isinstance(found, list):
        tail = done.stderr.strip().splitlines()
        print(f"  {tag}: no rows (exit {done.returncode}): {tail[-1] if tail else ''}", file=sys.stderr)
        return []
    return found


def print_table(title: str, rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    """A Markdown table of ``columns`` (floats to 4 significant digits, None as blank)."""
    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    body = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in body)) if body else len(c) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in body:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |")


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """All rows (union of their keys, first-seen order) as CSV, atomically; creates the folder."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_file_atomic(path, text.getvalue().encode("utf-8"))  # a killed script leaves the old file whole


def write_results(out: str | Path, summary: list[dict[str, Any]], rows: list[dict[str, Any]],
                  extra: dict[str, Any] | None = None) -> None:
    """The summary table at ``out`` and every measurement at ``<out folder>/raw/<out name>``.

    Only summaries sit at the top of the results folder: benchmarks/readme_results.py
    renders every CSV found there (not in raw/) into the README, quoting the exact
    command from ``<out>.json`` (written here, beside the summary) so that the
    README's numbers can be reproduced by the command it prints. ``extra``: more
    of the sitting's record for that JSON (e.g. the searches a benchmark ran).
    """
    out = Path(out)
    raw = out.parent / "raw" / out.name
    write_csv(out, summary)
    write_csv(raw, rows)
    script = Path(sys.argv[0]).resolve()
    script = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    command = shlex.join([".venv/bin/python", script.as_posix(), *sys.argv[1:]])
    finished = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    write_json_atomic(out.with_suffix(".json"), {"command": command, "finished_utc": finished, **(extra or {})})
    print(f"\nwrote {out} (summary) and {raw} (every measurement)")
