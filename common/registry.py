"""Names of backends and models, resolved lazily so nothing imports a framework early.

Models follow timm's pattern: ``list_models(pattern)`` is the one source of
truth for the CLI, sweeps and parametrized tests; each backend's models.py
registers its builders with ``ModelRegistry.register``.
"""
from __future__ import annotations

import fnmatch
import importlib
import os
from typing import Any, Callable

from common.architectures import ARCHITECTURES
from common.errors import ConfigError

# backend name -> (backend object "module:attr", worker module: `python -m MODULE TASK ...`)
_BACKENDS: dict[str, tuple[str, str]] = {
    "torch": ("torch_impl.backend:Backend", "torch_impl.worker"),
    "tensorflow": ("tf_impl.backend:Backend", "tf_impl.worker"),
    "keras-torch": ("kerastorch_impl.backend:Backend", "kerastorch_impl.worker"),  # Keras 3 on PyTorch
}
# Extra backends for tests: DUALBENCH_EXTRA_BACKENDS="fake=tests.fake_backend:FakeBackend;..."; their
# worker is the class's module run as `python -m MODULE NAME TASK ...` (it calls common.worker.main).
EXTRA_BACKENDS_ENV = "DUALBENCH_EXTRA_BACKENDS"
REAL_BACKENDS = ("torch", "tensorflow", "keras-torch")


def _all_backends() -> dict[str, tuple[str, str]]:
    table = dict(_BACKENDS)
    for item in filter(None, os.environ.get(EXTRA_BACKENDS_ENV, "").split(";")):
        name, target = item.split("=", 1)
        table[name.strip()] = (target.strip(), target.strip().split(":")[0])
    return table


def list_backends(include_extra: bool = True) -> list[str]:
    return list(_all_backends() if include_extra else _BACKENDS)


def check_backend(name: str) -> str:
    if name not in _all_backends():
        raise ConfigError(f"unknown backend {name!r}; choose from: {', '.join(list_backends())}")
    return name


def get_backend(name: str) -> Any:
    """A fresh backend object implementing common.backend.Backend (imports its framework)."""
    target = _all_backends()[check_backend(name)][0]
    module_name, attr = target.split(":")
    return getattr(importlib.import_module(module_name), attr)()


def worker_command(name: str) -> list[str]:
    """argv prefix (after the interpreter) that runs one worker for backend ``name``; the task follows."""
    module = _all_backends()[check_backend(name)][1]
    return ["-m", module] if name in _BACKENDS else ["-m", module, name]


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a glob ``pattern`` ('all' means '*')."""
    pattern = "*" if pattern in ("all", "") else pattern
    return [m for m in ARCHITECTURES if fnmatch.fnmatch(m, pattern)]


def parse_models(text: str) -> list[str]:
    """Comma-separated names or globs ('all') -> model names, with a clear error for unknown ones."""
    models: list[str] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        matched = list_models(item)
        if not matched:
            raise ConfigError(f"unknown model {item!r}; choose from: {', '.join(list_models())} (or 'all')")
        models += [m for m in matched if m not in models]
    if not models:
        raise ConfigError("no model given; try --models seed_cnn,resnet20")
    return models


class ModelRegistry:
    """Per-backend table of model builders: ``@MODELS.register("resnet20")``."""

    def __init__(self, backend: str):
        self.backend = backend
        self._builders: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        if name not in ARCHITECTURES:
            raise ValueError(f"{name!r} has no framework-free spec in common.architectures")

        def decorate(builder: Callable[..., Any]) -> Callable[..., Any]:
            self._builders[name] = builder
            return builder

        return decorate

    def names(self) -> list[str]:
        return list(self._builders)

    def create(self, name: str, **kwargs: Any) -> Any:
        if name not in self._builders:
            raise ConfigError(f"unknown model {name!r} for {self.backend}; choose from: {', '.join(self._builders)}")
        return self._builders[name](**kwargs)
