"""Session-wide test setup.

Importing tensorflow and THEN torchvision or triton in one process segfaults
on these machines (exit 139). Tests of both backends share one pytest
process, so torch and triton (which torch.compile may load) are imported
first, before any test can import tensorflow. The real runs never mix them:
each backend runs in its own worker subprocess.
"""
import importlib
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tf_impl  # noqa: F401  (sets KERAS_BACKEND before keras loads)

for _name in ("torch", "triton"):
    try:
        importlib.import_module(_name)
    except ImportError:
        pass


import pytest  # noqa: E402

MAX_TEST_WORKERS = 4  # each worker imports torch and TensorFlow (~1-2 GB resident with the tests' models)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist (the dev extra)
def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject's addopts): one worker per usable core, at most MAX_TEST_WORKERS."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_TEST_WORKERS, cores))


@pytest.fixture(autouse=True)
def _no_real_execution_search(monkeypatch):
    """A test never starts a real execution-configuration search (minutes of CI time) by accident:
    `--mode auto` on a real backend must hit the fallback (short runs) or be pinned. Searches of the
    fake backend (tests/fake_backend.py) are allowed."""
    from compare import tune

    measure = tune.Search.measure

    def guarded(self, config, stop_below):
        if tune.is_real(self.base.backend):
            raise AssertionError(f"a test started a real execution-configuration search for {self.base.backend}: "
                                 "pin --mode or use the fake backend")
        return measure(self, config, stop_below)

    monkeypatch.setattr(tune.Search, "measure", guarded)


def heavy_files_first(items: list) -> list:
    """``items`` with the test files holding the most ``slow`` tests first (collection order otherwise).

    pytest-xdist (``--dist loadfile``) hands whole files to its workers in collection order; the files
    with end-to-end runs and module fixtures of minutes go first, so the short files fill the workers'
    gaps at the end instead of one worker running a long file alone while the other idles."""
    def path(item) -> str:
        return item.nodeid.split("::")[0]

    slow: dict[str, int] = {}
    for item in items:
        slow[path(item)] = slow.get(path(item), 0) + (item.get_closest_marker("slow") is not None)
    order = {name: index for index, name in enumerate(slow)}  # first-seen order: the collection's
    return sorted(items, key=lambda item: (-slow[path(item)], order[path(item)]))


def pytest_collection_modifyitems(session, config, items):
    items[:] = heavy_files_first(items)
