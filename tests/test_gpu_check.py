"""benchmarks/gpu_check.py: what each check demands, the budget, and the CPU smoke run (torch only)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402

MIB = 2 ** 20


def _check(name):
    return next(c for c in gpu_check.CHECKS if c.name == name)


def _args(**overrides):
    return gpu_check.parse_args(["--device", "cuda", "--data", "synthetic", *overrides.get("argv", [])])


def _good(spec, on_cuda):
    """A result that passes every condition of its check."""
    settings = {"precision": spec.precision, "loss_scaling": "dynamic (initial scale 65536, growth interval 2000 steps)" if spec.precision == "fp16" else None,
                "execution_mode": "compile" if spec.mode == "compile" else "eager",
                "data_format": "NCHW channels_last" if spec.channels_last else "NCHW"}
    return {"status": "ok", "settings": settings, "clock_reads": 40, "unsynced_clock_reads": 0,
            "train_data_on": "device" if on_cuda else "host", "device_data_bytes": 240 * MIB if on_cuda else 0,
            "device_peak_bytes": 900 * MIB if on_cuda else None,
            "epochs": [{"epoch": e + 1} for e in range(spec.recipe.epochs)]}


@pytest.mark.parametrize("name", [c.name for c in gpu_check.CHECKS])
@pytest.mark.parametrize("on_cuda", [True, False])
def test_a_good_result_passes_its_check(name, on_cuda):
    check = _check(name)
    spec = gpu_check.spec_for(check, _args())
    assert gpu_check.problems(check, spec, _good(spec, on_cuda), on_cuda) == []


@pytest.mark.parametrize("name, broken, message", [
    ("fp32_eager", {"unsynced_clock_reads": 3}, "3 of 40 clock reads with device work queued"),
    ("fp32_eager", {"clock_reads": 0}, "clock reads"),
    ("fp32_eager", {"train_data_on": "host"}, "device data host"),
    ("fp32_eager", {"device_peak_bytes": None}, "device peak None"),
    ("fp32_eager", {"device_peak_bytes": 100 * MIB}, "device peak"),  # below the data it holds
    ("amp_bf16", {"settings": {"precision": "fp32"}}, "precision read back fp32, asked bf16"),
    ("amp_fp16", {"settings": {"precision": "fp16", "loss_scaling": None}}, "fp16 without GradScaler"),
    ("compile_channels_last", {"settings": {"precision": "fp32", "execution_mode": "compile",
                                            "data_format": "NCHW"}}, "asked compile + channels_last"),
    ("resnet18", {"epochs": [{"epoch": 1}]}, "1 of 3 epochs"),
    ("resnet18", {"status": "oom", "error": "CUDA out of memory"}, "status oom: CUDA out of memory"),
])
def test_each_broken_path_is_named(name, broken, message):
    check = _check(name)
    spec = gpu_check.spec_for(check, _args())
    found = gpu_check.problems(check, spec, {**_good(spec, True), **broken}, True)
    assert any(message in problem for problem in found), found


def test_a_stopped_run_reports_the_epochs_its_events_announced():
    check = _check("resnet18")
    spec = gpu_check.spec_for(check, _args())
    outcome = SimpleNamespace(timed_out=True, wall_s=300.0, host_peak_rss_bytes=2 * 2 ** 30,
                              events=[{"event": "ready"}, {"event": "epoch", "epoch": 1, "test_accuracy": 0.41},
                                      {"event": "epoch", "epoch": 2, "test_accuracy": 0.55}])
    row = gpu_check.row_for(check, spec, {}, outcome, on_cuda=True)
    assert row["status"] == "stopped" and row["epochs"] == 2 and row["test_acc_pct"] == pytest.approx(55.0)
    assert "--budget-s reached after 2 epoch(s)" in row["notes"]


def test_short_checks_are_capped_and_the_resnet18_run_is_whole_epochs():
    args = _args()
    short = gpu_check.spec_for(_check("amp_fp16"), args)
    assert (short.max_steps_per_epoch, short.precision, short.model, short.test_subset) == (40, "fp16", "resnet20", 2000)
    full = gpu_check.spec_for(_check("resnet18"), args)
    assert (full.model, full.mode, full.max_steps_per_epoch, full.recipe.epochs) == ("resnet18", "best", None, 3)


def test_budget_skips_what_cannot_start_and_still_writes_the_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DUALBENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "gpu_check.csv"
    assert gpu_check.main(["--device", "cpu", "--quick", "--budget-s", "0", "--out", str(out)]) == 1
    rows = list(csv.DictReader(out.open()))
    assert [r["status"] for r in rows] == ["skipped"] * len(gpu_check.CHECKS)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["command"].startswith("python ") and "--budget-s 0" in meta["command"] and meta["torch"]


def test_cuda_on_a_machine_without_one_is_one_clear_error(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    monkeypatch.setenv("DUALBENCH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit, match="--device cuda but torch sees no CUDA device: use --device cpu --quick"):
        gpu_check.main(["--device", "cuda", "--quick", "--out", str(tmp_path / "x.csv")])


BLOCKER = textwrap.dedent('''
    # What the GPU machine lacks is "not installed" here too: a None in sys.modules makes `import x` raise
    # ModuleNotFoundError and importlib.util.find_spec(x) return None, exactly as for a missing package.
    import sys
    for name in ("tensorflow", "keras", "tensorflow_datasets", "pandas", "tqdm", "matplotlib", "tabulate",
                 "pyarrow", "psutil", "scipy"):
        sys.modules[name] = None
''')


@pytest.mark.slow
def test_quick_cpu_run_passes_every_check_with_only_torch_installed(tmp_path):
    pytest.importorskip("torch")
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCKER)  # every process of the run gets it
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT)]),
           "DUALBENCH_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "gpu_check.csv"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    rows = list(csv.DictReader(out.open()))
    assert [r["check"] for r in rows] == [c.name for c in gpu_check.CHECKS]
    for row in rows:
        assert row["status"] == "ok", row
        assert int(row["clock_reads"]) > 0 and row["unsynced_clock_reads"] == "0" and row["data_on"] == "host"
        assert float(row["train_img_s"]) > 0 and row["device_peak_mib"] == ""  # CPU: n/a, never 0
    assert "| check " in done.stdout  # the one table
