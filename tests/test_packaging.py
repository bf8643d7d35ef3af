"""The install the README gives (`pip install -e .`) must make every project package importable.

setuptools' editable install maps exactly the packages pyproject.toml lists; one left out imports in
the tests (pytest runs from the repository root) and in workers (their PYTHONPATH holds the root),
yet not in a user's own `python -c "import keras_impl"` or any process started elsewhere.
"""
from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOT_INSTALLED = {"tests", "benchmarks"}  # run from a checkout, never imported by an installed dualbench


def test_pyproject_lists_every_top_level_package():
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    present = {p.parent.name for p in ROOT.glob("*/__init__.py")} - NOT_INSTALLED
    assert sorted(listed) == sorted(present), (f"missing from pyproject.toml: {sorted(present - set(listed))}; "
                                               f"listed but absent: {sorted(set(listed) - present)}")
