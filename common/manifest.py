"""The run manifest: everything needed to know where and how a number was measured."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Host allocator tuning given to every worker and benchmark process (both backends alike).
# glibc's defaults hand big freed blocks back to the kernel (munmap / heap trim), so a training
# step that frees and re-allocates the same buffers page-faults them all in again: torch eager on
# the CPU measured ~25% slower that way (10x the minor faults); TensorFlow, which pools its own
# buffers, measured the same either way (README results: benchmarks/bare_vs_dualbench.py).
# Keeping freed memory in the process is what the PyTorch CPU tuning guide gets from jemalloc or
# tcmalloc, without a new dependency. A value the user already set is kept; other libcs ignore these.
MALLOC_TUNING = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def allocator_setting(environ: Any = None) -> str:
    """The host allocator tuning this process started with, for the fairness audit."""
    environ = os.environ if environ is None else environ
    tuned = [f"{name}={environ[name]}" for name in MALLOC_TUNING if name in environ]
    return " ".join(tuned) if tuned else "libc defaults"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def git_commit() -> str | None:
    """The project's commit (with '+dirty' when the tree has local changes), if in a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                                text=True, timeout=5).stdout.strip()
        if not commit:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _package_versions(names: tuple[str, ...]) -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def collect_manifest(**extra: Any) -> dict[str, Any]:
    """Machine, OS, Python, core counts, package versions, git commit, time; plus ``extra``."""
    manifest = {
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": sys.version.split()[0],
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "hostname": platform.node(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "git_commit": git_commit(),
        "packages": _package_versions(("dualbench", "numpy", "pandas", "torch", "torchvision",
                                       "tensorflow", "keras", "tensorflow-datasets")),
    }
    manifest.update(extra)
    return manifest
