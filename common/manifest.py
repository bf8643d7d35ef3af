"""The run manifest: everything needed to know where and how a number was measured."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common.execution import ISA_LIMIT_ENV

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# CPU features that decide which kernels the math libraries run (oneDNN, MKL, XNNPACK, inductor):
# recorded in every manifest and part of the per-machine tuning fingerprint.
CPU_FEATURES = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")


def cpu_flags() -> list[str]:
    """The CPU_FEATURES this CPU reports (/proc/cpuinfo 'flags' on x86, 'Features' on ARM), in that order."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                present = set(line.split(":", 1)[1].split())
                return [name for name in CPU_FEATURES if name in present]
    except OSError:
        pass
    return []


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


def package_versions(names: tuple[str, ...]) -> dict[str, str]:
    """Installed version of each named distribution (importlib.metadata: nothing is imported); absent ones left out."""
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
        "cpu_flags": cpu_flags(),
        # variables that limit the instruction set the math libraries use (an emulated older CPU)
        "isa_limits": {name: os.environ[name] for name in ISA_LIMIT_ENV if name in os.environ},
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "git_commit": git_commit(),
        "packages": package_versions(("dualbench", "numpy", "pandas", "torch", "torchvision",
                                       "tensorflow", "keras", "tensorflow-datasets")),
    }
    manifest.update(extra)
    return manifest
