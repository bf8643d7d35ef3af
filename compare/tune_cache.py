"""Where search results are kept: one JSON file per machine fingerprint, under the cache root.

The fingerprint is everything that can change which configuration is fastest:
the CPU model and its features, the usable cores, the GPUs, the library
versions, the environment variables that limit the instruction set or preset
oneDNN, and ``SEARCH_VERSION`` (bumped when the search or its space changes).
A different fingerprint is a different file, so a changed machine never
reuses a stale choice. Inside a file, entries are keyed by what the search
measured (backend, model, device, precision, batch size, threads, pins).

Location: ``$DUALBENCH_TUNING_CACHE``, else ``<dataset cache root>/tuning``
(``common.data.default_cache_dir()``). Read-modify-write holds an advisory
lock, so two dualbench processes tuning at once do not drop each other's entries.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

from common.execution import ISA_LIMIT_ENV, MALLOC_TUNING, ONEDNN_ENV
from common.manifest import cpu_flags, cpu_model, package_versions, usable_cores
from common.results import write_json_atomic

SEARCH_VERSION = 1  # bump when the search procedure, its space or its measurement changes
CACHE_ENV = "DUALBENCH_TUNING_CACHE"
_PACKAGES = ("torch", "tensorflow", "keras", "numpy", "triton")


def cache_dir() -> Path:
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    from common.data import default_cache_dir

    return default_cache_dir() / "tuning"


def _gpus() -> list[str]:
    """GPU names from nvidia-smi (the parent never imports a framework); [] without one."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in done.stdout.splitlines() if line.strip()] if done.returncode == 0 else []


def machine_fingerprint() -> dict[str, Any]:
    """What makes a tuning result valid on this machine (see the module docstring)."""
    environment = {name: os.environ.get(name) for name in (*ISA_LIMIT_ENV, ONEDNN_ENV, *MALLOC_TUNING,
                                                           "CUDA_VISIBLE_DEVICES")}
    return {"search_version": SEARCH_VERSION, "cpu_model": cpu_model(), "cpu_flags": cpu_flags(),
            "usable_cores": usable_cores(), "gpus": _gpus(), "packages": package_versions(_PACKAGES),
            "environment": {k: v for k, v in environment.items() if v is not None}}


def fingerprint_id(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode("utf-8")).hexdigest()[:16]


class TuningCache:
    """The cached search records of one machine fingerprint."""

    def __init__(self, fingerprint: dict[str, Any] | None = None, root: Path | None = None):
        self.fingerprint = fingerprint if fingerprint is not None else machine_fingerprint()
        self.root = Path(root) if root is not None else cache_dir()
        self.path = self.root / f"{fingerprint_id(self.fingerprint)}.json"

    def _read(self) -> dict[str, Any]:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return raw.get("entries", {}) if raw.get("fingerprint") == self.fingerprint else {}

    def get(self, key: str) -> dict[str, Any] | None:
        return self._read().get(key)

    def entries(self) -> dict[str, dict[str, Any]]:
        return self._read()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as handle:
            try:
                import fcntl

                fcntl.flock(handle, fcntl.LOCK_EX)
            except ImportError:  # not POSIX: no lock
                pass
            yield

    def put(self, key: str, record: dict[str, Any]) -> None:
        """Store ``record`` under ``key`` (atomic file replacement, under the lock)."""
        with self._locked():
            entries = self._read()
            entries[key] = record
            write_json_atomic(self.path, {"fingerprint": self.fingerprint, "entries": entries})
