"""`dualbench list`: models, backends and dataset SPECs.

Each section is a small function returning its lines; add a section by
appending to ``SECTIONS``.
"""
from __future__ import annotations

import argparse
from typing import Callable


def model_lines() -> list[str]:
    """One line per registered architecture, with the first line of its docstring."""
    from common.architectures import ARCHITECTURES

    width = max(len(name) for name in ARCHITECTURES)
    return [f"  {name:<{width}}  {_first_line(builder.__doc__)}".rstrip()
            for name, builder in ARCHITECTURES.items()]


def backend_lines() -> list[str]:
    """One line per backend with its execution modes."""
    from common.config import BACKEND_MODES

    width = max(len(name) for name in BACKEND_MODES)
    return [f"  {name:<{width}}  modes: {', '.join(modes)}" for name, modes in BACKEND_MODES.items()]


def dataset_lines() -> list[str]:
    """One line per dataset SPEC form, with its description."""
    from common.data import DATASET_SPECS

    width = max(len(pattern) for pattern, _ in DATASET_SPECS)
    return [f"  {pattern:<{width}}  {description}" for pattern, description in DATASET_SPECS]


# (title, line builder), printed in this order
SECTIONS: list[tuple[str, Callable[[], list[str]]]] = [
    ("models (--models)", model_lines),
    ("backends (--backends)", backend_lines),
    ("datasets (--data SPEC)", dataset_lines),
]


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().split("\n")[0]


def register(parser: argparse.ArgumentParser) -> None:
    """`list` takes no options."""


def main(args: argparse.Namespace) -> int:
    """Print every section; returns the exit code."""
    blocks = []
    for title, build in SECTIONS:
        blocks.append("\n".join([f"{title}:", *build()]))
    print("\n\n".join(blocks))
    return 0
