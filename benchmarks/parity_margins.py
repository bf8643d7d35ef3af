"""How close the parity measures come to their criteria, per CPU kernel family: the evidence behind them.

fp32 results differ in the last bits between CPU families (AVX2 vs AVX-512
kernels, TensorFlow with or without oneDNN), which is why the parity criteria
are relative (compare.parity.DEFAULT_RTOL) and training is judged step by step
(compare.step_parity.STEP_TOLERANCE). This script runs `dualbench parity`
(forward, all models, unfriendly inputs) and `dualbench parity --training`
under each kernel configuration and reports the worst measured value of every
criterion beside its limit, so the margin is visible:

* ``native``: this CPU's own kernels and TensorFlow's default oneDNN setting;
* ``avx2``: torch's ATen and oneDNN, MKL and TensorFlow's oneDNN restricted to
  AVX2 (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
  MKL_ENABLE_INSTRUCTIONS=AVX2``), TensorFlow's oneDNN off as TF 2.21 defaults
  on an AVX2-only CPU (``TF_ENABLE_ONEDNN_OPTS=0``);
* ``avx2-onednn``: the same with TensorFlow's oneDNN on.

On an AVX-512 machine the AVX2 configurations emulate an AVX2-only CPU's
kernels (not its timing). A separate TorchInductor cache is used for them:
inductor's cache key ignores ATEN_CPU_CAPABILITY.

    .venv/bin/python benchmarks/parity_margins.py [--quick]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from _common import ROOT, _env, base_parser, machine_header, print_table, split, write_results

AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
CONFIGS = {"native": {}, "avx2": {**AVX2, "TF_ENABLE_ONEDNN_OPTS": "0"},
           "avx2-onednn": {**AVX2, "TF_ENABLE_ONEDNN_OPTS": "1"}}


def parity_json(args: list[str], env_extra: dict[str, str], timeout_s: float) -> dict:
    """`dualbench parity ... --json` in a subprocess with extra environment; its JSON (forward/training)."""
    env = {**_env(), **env_extra}
    done = subprocess.run([sys.executable, "-m", "compare", "parity", *args, "--json"], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=timeout_s)
    start = done.stdout.find("{") if "--training" in args else done.stdout.find("[")
    if start < 0:
        tail = done.stderr.strip().splitlines()
        raise SystemExit(f"dualbench parity failed (exit {done.returncode}): {tail[-1] if tail else ''}")
    found = json.loads(done.stdout[start:])
    return found if isinstance(found, dict) else {"forward": found, "training": []}


def summarise(config: str, found: dict) -> list[dict]:
    """One row per model (forward) and per training case: worst measured value and its limit."""
    from compare.parity import DEFAULT_RTOL
    from compare.step_parity import CASES, STEP_TOLERANCE

    rows = [{"config": config, "check": "forward", "subject": r["model"], "criterion": "max_rel_diff",
             "worst": r["max_rel_diff"], "limit": DEFAULT_RTOL, "passed": r["passed"]} for r in found["forward"]]
    for case in found["training"]:
        limits = {**STEP_TOLERANCE, "grad_rel": CASES[case["case"]].get("grad_tolerance", STEP_TOLERANCE["grad_rel"])}
        rows += [{"config": config, "check": "training", "subject": case["case"], "criterion": key,
                  "worst": case[key], "limit": limit, "passed": case[key] <= limit} for key, limit in limits.items()]
    for row in rows:
        row["margin"] = row["limit"] / row["worst"] if row["worst"] else None
    return rows


def main() -> int:
    parser = base_parser(__doc__.split("\n")[0], "parity_margins.csv")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="kernel configurations (default %(default)s)")
    parser.set_defaults(models="all")
    args = parser.parse_args()
    print(machine_header(args.threads))
    models = "seed_cnn" if args.quick else args.models
    rows = []
    with tempfile.TemporaryDirectory(prefix="dualbench-inductor-") as inductor_cache:
        for config in split(args.configs):
            env = dict(CONFIGS[config])
            if env:
                env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(inductor_cache, config)
            forward_args = ["--models", models] + (["--in-shape", "16,16,3", "--batch", "4"] if args.quick else [])
            found = parity_json(forward_args + ([] if args.quick else ["--training"]), env, timeout_s=3600)
            rows += summarise(config, found)
            print(f"{config}: {sum(r['passed'] for r in rows if r['config'] == config)} of "
                  f"{sum(r['config'] == config for r in rows)} criteria met", flush=True)
    columns = ["config", "check", "subject", "criterion", "worst", "limit", "margin", "passed"]
    print_table("Worst measured parity values against their criteria (margin = limit / worst)", rows, columns)
    write_results(args.out, rows, rows)
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
