"""Shared CLI options -> validated RunSpec / Recipe (used by `run`, reusable by `bench`).

Defaults live in one place, the ``Recipe`` / ``RunSpec`` dataclasses: an option
the user does not give stays ``None`` here and the dataclass default applies.
Every value is validated by the dataclasses; their ``ConfigError`` is re-raised
naming the command-line flag to fix (the CLI prints it as one line, exit 2).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
from typing import Any

from common.config import (BACKEND_MODES, INIT_SCHEMES, OPTIMIZERS, PRECISIONS, SCHEDULES,
                           WEIGHT_DECAY_MODES, Recipe, RunSpec)
from common.errors import ConfigError
from common.registry import check_backend, parse_models

# flag dest -> Recipe field (flags not listed here map onto RunSpec fields of the same name)
RECIPE_FLAGS = {
    "epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "optimizer": "optimizer",
    "schedule": "schedule", "warmup_epochs": "warmup_epochs", "weight_decay": "weight_decay",
    "wd_mode": "weight_decay_mode", "momentum": "momentum", "nesterov": "nesterov",
    "label_smoothing": "label_smoothing", "init": "init_scheme", "bn_momentum": "bn_momentum",
    "bn_epsilon": "bn_epsilon", "adam_epsilon": "adam_epsilon", "no_augment": "augment",
    "crop_padding": "crop_padding", "hflip": "horizontal_flip", "mean": "mean", "std": "std",
}
SPEC_FLAGS = ("data", "device", "precision", "threads", "deterministic", "allow_tf32", "train_subset",
              "test_subset", "warmup_steps", "max_steps_per_epoch", "eval_every_steps", "target_accuracy")
CHANNELS_LAST = {"auto": None, "on": True, "off": False}
DEFAULT_BACKENDS = "torch,tensorflow"


def _default(cls: type, name: str) -> Any:
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    return field.default


def add_selection_options(parser: argparse.ArgumentParser) -> None:
    """--models and --backends."""
    parser.add_argument("--models", required=True,
                        help="comma-separated model names or globs, or 'all' (see `dualbench list`)")
    parser.add_argument("--backends", default=DEFAULT_BACKENDS,
                        help=f"comma-separated backends, in run order (default {DEFAULT_BACKENDS})")


def add_spec_options(parser: argparse.ArgumentParser) -> None:
    """Where and how a run executes: data, device, precision, mode, threads, subsets, step caps."""
    p = parser.add_argument
    p("--data", default=None, help=f"dataset SPEC (default {_default(RunSpec, 'data')}; see `dualbench list`)")
    p("--device", default=None, help="auto | cpu | cuda | cuda:N (default auto)")
    p("--precision", default=None, choices=PRECISIONS, help="compute precision (default fp32)")
    p("--mode", default="best",
      help="execution mode: one mode for every backend (e.g. best, eager) or per backend "
           "'torch=compile,tensorflow=xla'; modes: "
           + "; ".join(f"{b}: {'/'.join(m)}" for b, m in BACKEND_MODES.items()))
    p("--threads", type=int, default=None, help="intra-op threads for both frameworks (default: all cores)")
    p("--deterministic", action="store_true", default=None, help="framework determinism switches (slower)")
    p("--allow-tf32", action="store_true", default=None, help="allow TensorFloat-32 on Ampere+ GPUs")
    p("--channels-last", choices=tuple(CHANNELS_LAST), default="auto",
      help="torch memory format (auto: the backend decides)")
    p("--train-subset", type=int, default=None, help="stratified training subset size (images)")
    p("--test-subset", type=int, default=None, help="stratified test subset size (images)")
    p("--warmup-steps", type=int, default=None,
      help=f"steps excluded from throughput after the compile step (default {_default(RunSpec, 'warmup_steps')})")
    p("--max-steps-per-epoch", type=int, default=None, help="cap training steps per epoch (smoke runs)")


def add_recipe_options(parser: argparse.ArgumentParser) -> None:
    """The training recipe; defaults shown are the Recipe dataclass defaults."""
    p = parser.add_argument
    r = Recipe()
    p("--epochs", type=int, default=None, help=f"training epochs (default {r.epochs})")
    p("--batch-size", type=int, default=None, help=f"images per training step (default {r.batch_size})")
    p("--lr", type=float, default=None, help=f"peak learning rate (default {r.lr})")
    p("--optimizer", choices=OPTIMIZERS, default=None, help=f"optimizer (default {r.optimizer})")
    p("--schedule", choices=SCHEDULES, default=None, help=f"LR schedule (default {r.schedule})")
    p("--warmup-epochs", type=float, default=None, help=f"linear LR warm-up, epochs (default {r.warmup_epochs})")
    p("--weight-decay", type=float, default=None, help=f"weight decay coefficient (default {r.weight_decay})")
    p("--wd-mode", choices=WEIGHT_DECAY_MODES, default=None,
      help=f"weight-decay semantics (default {r.weight_decay_mode})")
    p("--momentum", type=float, default=None, help=f"SGD momentum (default {r.momentum})")
    p("--no-nesterov", dest="nesterov", action="store_false", default=None, help="plain (not Nesterov) momentum")
    p("--label-smoothing", type=float, default=None, help=f"label smoothing in [0, 1) (default {r.label_smoothing})")
    p("--init", choices=INIT_SCHEMES, default=None, help=f"initial-weights scheme (default {r.init_scheme})")
    p("--bn-momentum", type=float, default=None,
      help=f"BatchNorm momentum, torch convention; Keras gets 1 - m (default {r.bn_momentum})")
    p("--bn-epsilon", type=float, default=None, help=f"BatchNorm epsilon (default {r.bn_epsilon})")
    p("--adam-epsilon", type=float, default=None, help=f"Adam/AdamW epsilon (default {r.adam_epsilon})")
    p("--no-augment", dest="no_augment", action="store_false", default=None,
      help="no random crop / flip (the sampler still fixes the order)")
    p("--crop-padding", type=int, default=None, metavar="PX",
      help="zero padding before the random crop, pixels (default: per dataset, an eighth of the side)")
    p("--hflip", type=_on_off, default=None, metavar="{on,off}",
      help="random horizontal flips (default: per dataset; off for MNIST digits)")
    p("--mean", type=_floats, default=None, metavar="M[,M,M]",
      help="normalisation mean per channel in [0, 1] (default: the dataset's training-set mean)")
    p("--std", type=_floats, default=None, metavar="S[,S,S]",
      help="normalisation std per channel (default: the dataset's training-set std)")


def add_evaluation_options(parser: argparse.ArgumentParser) -> None:
    """Time to accuracy: evaluations within epochs and the target accuracy."""
    p = parser.add_argument
    p("--eval-every-steps", type=int, default=None, metavar="S",
      help="also evaluate every S optimiser steps (default: at epoch ends only); evaluation is never "
           "counted as training time")
    p("--target-accuracy", type=float, default=None, metavar="A",
      help="test accuracy in (0, 1] for time to accuracy: the training wall-clock at the first evaluation "
           "that reaches it (DAWNBench / MLPerf)")


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return text == "on"


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _name_the_flag(exc: ConfigError, fields_to_flags: dict[str, str]) -> ConfigError:
    """Append 'fix --flag' to a dataclass validation message that names a field."""
    message = str(exc)
    # the field a message is about comes first ("warmup_epochs must be in [0, epochs]")
    for pattern in (r"^(unknown )?{}\b", r"\b{}\b"):
        for field_name, flag in fields_to_flags.items():
            if re.search(pattern.format(re.escape(field_name)), message):
                return ConfigError(f"{message} (fix {flag})")
    return exc


def explicit_recipe_fields(args: argparse.Namespace) -> dict[str, Any]:
    """{Recipe field: value} of every field the user set on the command line (they win over
    the per-dataset defaults of common.data.defaults)."""
    return {field: getattr(args, dest) for dest, field in RECIPE_FLAGS.items() if getattr(args, dest, None) is not None}


def build_recipe(args: argparse.Namespace) -> Recipe:
    """The Recipe from the recipe options (dataclass defaults for options not given)."""
    given = explicit_recipe_fields(args)
    if len({"mean", "std"} & set(given)) == 1:  # one of the pair: checked per dataset by apply_defaults
        given.pop("mean", None), given.pop("std", None)
    try:
        return Recipe(**given)
    except ConfigError as exc:
        raise _name_the_flag(exc, {field: _flag(dest) for dest, field in RECIPE_FLAGS.items()}) from None


def parse_backends(text: str) -> list[str]:
    """Comma list -> known backend names, in the given order, without duplicates."""
    names = [part.strip() for part in str(text).split(",") if part.strip()]
    if not names:
        raise ConfigError("no backend given; try --backends torch,tensorflow")
    if len(set(names)) != len(names):
        raise ConfigError(f"--backends lists a backend twice: {text!r}")
    keras_backend = os.environ.get("KERAS_BACKEND")
    if "tensorflow" in names and keras_backend and keras_backend != "tensorflow":
        raise ConfigError(f"KERAS_BACKEND={keras_backend} is set in your environment, but the tensorflow "
                          "backend runs Keras on TensorFlow: unset KERAS_BACKEND (dualbench sets it per worker)")
    return [check_backend(name) for name in names]


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2] (non-negative, distinct)."""
    seeds: list[int] = []
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        if not part.isdigit():
            raise ConfigError(f"--seeds takes non-negative integers like 0,1,2; got {part!r}")
        if int(part) in seeds:
            raise ConfigError(f"--seeds lists seed {part} twice")
        seeds.append(int(part))
    if not seeds:
        raise ConfigError("no seed given; try --seeds 0,1,2")
    return seeds


def parse_modes(text: str, backends: list[str]) -> dict[str, str]:
    """--mode -> {backend: mode}. One mode applies to all backends; 'b=m,...' sets them one by one."""
    text = str(text or "best").strip()
    if "=" not in text:
        mismatched = [b for b in backends if b in BACKEND_MODES and text not in BACKEND_MODES[b]]
        if mismatched:
            b = mismatched[0]
            raise ConfigError(f"--mode {text} does not exist for {b} (it has {', '.join(BACKEND_MODES[b])}); "
                              f"give modes per backend, e.g. --mode torch=compile,tensorflow=xla")
        return {b: text for b in backends}
    modes = {b: "best" for b in backends}
    for item in filter(None, (p.strip() for p in text.split(","))):
        backend, sep, mode = (s.strip() for s in item.partition("="))
        if not sep or not mode:
            raise ConfigError(f"--mode item {item!r} is not BACKEND=MODE, e.g. torch=compile")
        if backend not in backends:
            raise ConfigError(f"--mode names backend {backend!r}, which is not in --backends {','.join(backends)}")
        if backend in BACKEND_MODES and mode not in BACKEND_MODES[backend]:
            raise ConfigError(f"unknown mode {mode!r} for {backend}; choose one of: "
                              f"{', '.join(BACKEND_MODES[backend])} (fix --mode)")
        modes[backend] = mode
    return modes


def spec_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """RunSpec keyword arguments shared by every run (everything but model/backend/seed/mode)."""
    kwargs = {name: getattr(args, name) for name in SPEC_FLAGS if getattr(args, name, None) is not None}
    kwargs["channels_last"] = CHANNELS_LAST[getattr(args, "channels_last", "auto") or "auto"]
    return kwargs


def make_spec(model: str, backend: str, seed: int, mode: str, recipe: Recipe, shared: dict[str, Any],
              checkpoint_dir: str | None = None) -> RunSpec:
    """One validated RunSpec (ConfigError names the flag to fix)."""
    try:
        return RunSpec(model=model, backend=backend, seed=seed, mode=mode, recipe=recipe,
                       checkpoint_dir=checkpoint_dir, **shared)
    except ConfigError as exc:
        flags = {name: _flag(name) for name in SPEC_FLAGS}
        flags.update({"seed": "--seeds", "mode": "--mode"})
        raise _name_the_flag(exc, flags) from None


def _recipe_words(recipe: dict[str, Any]) -> list[str]:
    """Flags for the recipe fields that differ from Recipe's defaults and were not per-dataset defaults."""
    words, recipe_defaults = [], Recipe()
    defaulted = set(recipe.get("defaulted_fields") or ())  # the same data fills them again
    for dest, field_name in RECIPE_FLAGS.items():
        value = recipe.get(field_name, getattr(recipe_defaults, field_name))
        default = getattr(recipe_defaults, field_name)
        if isinstance(default, tuple):
            value = tuple(value)
        if field_name in defaulted or value == default:
            continue
        if dest in ("nesterov", "no_augment"):  # store_false switches
            words.append("--no-nesterov" if dest == "nesterov" else "--no-augment")
        elif dest == "hflip":
            words += ["--hflip", "on" if value else "off"]
        elif isinstance(value, tuple):
            words += [_flag(dest), ",".join(f"{v:g}" for v in value)]
        else:
            words += [_flag(dest), str(value)]
    return words


def parse_selection(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(models, backends) from --models / --backends."""
    return parse_models(args.models), parse_backends(args.backends)


def command_for(specs: list[dict[str, Any]], out: str | None = None) -> str:
    """The `dualbench run` command line that reproduces runs with these specs (RunSpec dicts)."""
    import shlex

    if not specs:
        return "dualbench run"
    models = list(dict.fromkeys(s["model"] for s in specs))
    backends = list(dict.fromkeys(s["backend"] for s in specs))
    seeds = sorted({int(s["seed"]) for s in specs})
    words = ["dualbench", "run", "--models", ",".join(models), "--backends", ",".join(backends),
             "--seeds", ",".join(map(str, seeds))]
    modes = {s["backend"]: s.get("mode", "best") for s in specs}
    if set(modes.values()) != {"best"}:
        distinct = set(modes.values())
        words += ["--mode", distinct.pop() if len(distinct) == 1 else ",".join(f"{b}={m}" for b, m in modes.items())]
    first, defaults = specs[0], RunSpec(model="x", backend="x").to_dict()
    for name in SPEC_FLAGS:
        value = first.get(name, defaults[name])
        if value != defaults[name]:
            words += [_flag(name)] if isinstance(value, bool) else [_flag(name), str(value)]
    channels = first.get("channels_last")
    if channels is not None:
        words += ["--channels-last", "on" if channels else "off"]
    words += _recipe_words(first.get("recipe", {}))
    if first.get("checkpoint_dir"):
        words.append("--checkpoint")
    if out:
        words += ["--out", str(out)]
    return shlex.join(words)
