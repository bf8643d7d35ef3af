"""Progress display for `dualbench run`: tqdm bars on a terminal, one plain line per event otherwise.

Bars go to stderr (tqdm's default); plain lines go to stdout so that CI logs
and ``> log.txt`` keep a readable record of every epoch.
"""
from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm import tqdm


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """Overall bar over runs plus a per-run bar over epochs (from the worker's events)."""

    def __init__(self, total_runs: int, *, enabled: bool | None = None, out: TextIO | None = None):
        self.out = out or sys.stdout
        self.bars = _is_tty(sys.stderr) and _is_tty(self.out) if enabled is None else enabled
        self.total = total_runs
        self.index = 0
        self.run_id = ""
        self.epochs = 0
        self.overall = tqdm(total=total_runs, desc="runs", unit="run", position=0,
                            disable=not self.bars, dynamic_ncols=True)
        self.epoch_bar: tqdm | None = None

    def line(self, text: str) -> None:
        """A message that never garbles the bars."""
        if self.bars:
            tqdm.write(text, file=sys.stderr)
        else:
            print(text, file=self.out, flush=True)

    def start_run(self, run_id: str, epochs: int) -> None:
        self.index += 1
        self.run_id, self.epochs = run_id, epochs
        self.overall.set_postfix_str(run_id)
        self.epoch_bar = tqdm(total=epochs, desc=run_id, unit="epoch", position=1, leave=False,
                              disable=not self.bars, dynamic_ncols=True)
        self.line(f"[{self.index}/{self.total}] {run_id}: starting")

    def event(self, event: dict[str, Any]) -> None:
        """Handle one ``DUALBENCH_EVENT`` from the worker."""
        kind = event.get("event")
        prefix = f"[{self.index}/{self.total}] {self.run_id}"
        if kind == "ready":
            if not self.bars:
                self.line(f"{prefix}: ready ({event.get('epochs', self.epochs)} epochs)")
        elif kind == "resumed":
            if self.epoch_bar is not None:
                self.epoch_bar.update(int(event.get("epoch", 0)) - self.epoch_bar.n)
            self.line(f"{prefix}: resumed from checkpoint after epoch {event.get('epoch')}")
        elif kind == "epoch":
            accuracy = event.get("test_accuracy")
            acc_text = f"{100 * accuracy:.2f}%" if isinstance(accuracy, (int, float)) else "n/a"
            if self.epoch_bar is not None and not self.epoch_bar.disable:
                self.epoch_bar.set_postfix_str(f"test acc {acc_text}")
                self.epoch_bar.update(1)
            else:
                loss = event.get("train_loss")
                loss_text = f"{loss:.4f}" if isinstance(loss, (int, float)) else "n/a"
                self.line(f"{prefix}: epoch {event.get('epoch')}/{self.epochs} train loss {loss_text} "
                          f"test acc {acc_text} ({event.get('wall_s', 0):.1f} s)")

    def end_run(self, result: Any, skipped: bool = False) -> None:
        if self.epoch_bar is not None:
            self.epoch_bar.close()
            self.epoch_bar = None
        if skipped:
            self.index += 1
            self.line(f"[{self.index}/{self.total}] {result}: already ok in --out, skipped (--force reruns it)")
        else:
            accuracy = result.test_accuracy
            detail = (f"test acc {100 * accuracy:.2f}%" if result.status == "ok" and accuracy is not None
                      else (result.error or ""))
            self.line(f"[{self.index}/{self.total}] {result.run_id}: {result.status} {detail}".rstrip())
        self.overall.update(1)

    def close(self) -> None:
        if self.epoch_bar is not None:
            self.epoch_bar.close()
        self.overall.close()
