"""The results folder (``--out``): where every file lives, and safe reads and writes.

Layout::

    OUT/runs.jsonl              one RunResult per line (upserted atomically per finished run)
    OUT/audit.json, audit.csv   fairness audit per model (settings per backend, asymmetries)
    OUT/manifest.json           machine, versions, git commit, data fingerprint, command line
    OUT/summary.csv/.parquet    tables (compare.tables)
    OUT/report.md, report.html  the report (compare.report)
    OUT/plots/*.png             figures (compare.plots)
    OUT/logs/<run_id>.log       each worker's stderr
    OUT/weights/<run_id>.npz    each ok run's final canonical weights (what `dualbench export` exports)
    OUT/export/                 `dualbench export`: artifacts, deployment.csv/.json, latency plot
    OUT/checkpoints/<run_id>/   per-epoch checkpoints while a run is unfinished (--checkpoint)
    OUT/.lock                   held by the `dualbench run` writing here (one at a time)

Every write is atomic (temp file + ``os.replace``), so a crash or Ctrl-C never
leaves a half-written file behind.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from common.errors import UserError
from common.results import (RunResult, read_jsonl, upsert_jsonl_atomic, write_bytes_atomic,
                            write_json_atomic)


@contextlib.contextmanager
def _write_errors(path: Path) -> Iterator[None]:
    """A failed write (disk full, permissions) becomes one line naming the fix; the old file is intact."""
    try:
        yield
    except OSError as exc:
        raise UserError(f"cannot write {path} ({exc.strerror or exc}); the file already there is intact: "
                        "free disk space or fix permissions, then rerun") from None


def write_file_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically with normal permissions; UserError naming the fix on failure."""
    path = Path(path)
    with _write_errors(path):
        write_bytes_atomic(path, data)
    return path


class ResultsStore:
    """One results folder. Paths are attributes; writers are atomic."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()
        self.runs_path = self.root / "runs.jsonl"
        self.audit_json = self.root / "audit.json"
        self.audit_csv = self.root / "audit.csv"
        self.manifest_path = self.root / "manifest.json"
        self.plots_dir = self.root / "plots"
        self.logs_dir = self.root / "logs"

    # -- folder ---------------------------------------------------------------
    def ensure_writable(self) -> None:
        """Create the folder and prove a file can be written there (UserError naming the fix)."""
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"--out {self.root} is a file, not a folder: choose another --out")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=self.root)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise UserError(f"cannot write to --out {self.root} ({exc.strerror or exc}): "
                            "choose a writable folder") from None

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold OUT/.lock for one `dualbench run`; a second run on the same folder gets a UserError.

        Two runs upserting the same runs.jsonl would each write whole-file
        replacements and lose the other's rows. The lock is an OS advisory lock
        (released by the kernel however the holder dies), so a killed run never
        leaves the folder locked. Holding it also proves that any ``.work-*``
        folder left here belongs to a dead run, so those are removed.
        """
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, the rest works the same
            yield
            return
        path = self.root / ".lock"
        with _write_errors(path), open(path, "a+", encoding="utf-8") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise UserError(f"another `dualbench run` ({holder}) is writing to {self.root}: wait for it "
                                "to finish, or choose another --out") from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()}")
            handle.flush()
            for stale in self.root.glob(".work-*"):
                shutil.rmtree(stale, ignore_errors=True)
            try:
                yield
            finally:
                handle.truncate(0)
                fcntl.flock(handle, fcntl.LOCK_UN)

    def checkpoint_dir(self, run_id: str) -> Path:
        return self.root / "checkpoints" / run_id

    def weights_path(self, run_id: str) -> Path:
        """Where a run's final canonical weights are kept (.npz)."""
        return self.root / "weights" / f"{run_id}.npz"

    def log_path(self, name: str) -> Path:
        return self.logs_dir / f"{name}.log"

    # -- runs -----------------------------------------------------------------
    def load_rows(self) -> list[dict[str, Any]]:
        """The raw rows of runs.jsonl ([] when absent); UserError when it cannot be parsed."""
        try:
            return read_jsonl(self.runs_path)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{self.runs_path} is not valid JSON lines ({exc}): repair it or move it away "
                            "and rerun") from None
        except OSError as exc:
            raise UserError(f"cannot read {self.runs_path} ({exc.strerror or exc})") from None

    def load_runs(self) -> list[RunResult]:
        return [RunResult.from_dict(row) for row in self.load_rows()]

    def upsert_run(self, result: RunResult | dict[str, Any]) -> None:
        """Replace (or add) this run's row; the file is rewritten atomically (old file intact on failure)."""
        row = result.to_dict() if isinstance(result, RunResult) else result
        with _write_errors(self.runs_path):
            upsert_jsonl_atomic(self.runs_path, row)

    # -- audit ----------------------------------------------------------------
    def load_audit(self) -> dict[str, Any]:
        """audit.json as {"models": {model: {...}}}; empty when absent or unreadable."""
        try:
            raw = json.loads(self.audit_json.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {"models": {}}
        return raw if isinstance(raw, dict) and isinstance(raw.get("models"), dict) else {"models": {}}

    def load_manifest(self) -> dict[str, Any]:
        try:
            raw = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return raw if isinstance(raw, dict) else {}

    # -- generic writers --------------------------------------------------------
    def write_json(self, name: str, obj: Any) -> Path:
        path = self.root / name
        with _write_errors(path):
            write_json_atomic(path, obj)
        return path

    def write_text(self, name: str, text: str) -> Path:
        return self.write_bytes(name, text.encode("utf-8"))

    def write_bytes(self, name: str, data: bytes) -> Path:
        return write_file_atomic(self.root / name, data)

    def write_table(self, name: str, frame: pd.DataFrame, parquet: bool = True) -> list[Path]:
        """``name``.csv (NaN written as "n/a") and, with ``parquet``, ``name``.parquet (NaN as null)."""
        written = [self.write_bytes(f"{name}.csv", frame.to_csv(index=False, na_rep="n/a").encode("utf-8"))]
        if parquet:
            buffer = io.BytesIO()
            frame.to_parquet(buffer, index=False)
            written.append(self.write_bytes(f"{name}.parquet", buffer.getvalue()))
        return written
