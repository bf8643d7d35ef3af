"""Shared CLI options -> validated RunSpec / Recipe (used by `run`; `bench` shares the execution ones).

Defaults live in one place, the ``Recipe`` / ``RunSpec`` dataclasses: an option
the user does not give stays ``None`` here and the dataclass default applies
(the help text shows that default, with its unit). Every value is validated by
the dataclasses; their ``ConfigError`` carries the field it is about, and is
re-raised naming the flag that sets that field (the CLI prints it as one
line, exit 2).

One vocabulary across subcommands: a flag that takes a list in one command
(``bench --batch-size 32,128``) has the same name where it takes one value
(``run --batch-size 128``); the measurement warm-up (``--measure-warmup-steps``)
and the learning-rate warm-up (``--lr-warmup-epochs``) cannot be confused. Old
spellings still parse (hidden from --help).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from common.config import (BACKEND_MODES, BACKEND_STYLES, INIT_SCHEMES, LR_SCALING, OPTIMIZERS, PRECISIONS,
                           SCHEDULES, STYLES, WEIGHT_DECAY_MODES, Recipe, RunSpec)
from common.errors import ConfigError
from common.registry import check_backend, parse_models

# flag -> the Recipe field(s) it sets (argparse dest = the flag without dashes, '-' -> '_')
RECIPE_FLAGS: dict[str, str | tuple[str, ...]] = {
    "--epochs": "epochs", "--batch-size": "batch_size", "--eval-batch-size": "eval_batch_size", "--lr": "lr",
    "--optimizer": "optimizer", "--schedule": "schedule", "--lr-warmup-epochs": "warmup_epochs",
    "--weight-decay": "weight_decay", "--wd-mode": "weight_decay_mode", "--decay-bn-and-bias": "decay_bn_and_bias",
    "--momentum": "momentum", "--no-nesterov": "nesterov", "--adam-betas": ("adam_beta1", "adam_beta2"),
    "--adam-epsilon": "adam_epsilon", "--label-smoothing": "label_smoothing", "--dropout": "dropout",
    "--init": "init_scheme", "--bn-momentum": "bn_momentum", "--bn-epsilon": "bn_epsilon",
    "--no-augment": "augment", "--crop-padding": "crop_padding", "--hflip": "horizontal_flip", "--mean": "mean",
    "--std": "std",
}
# flag -> the RunSpec field it sets
SPEC_FLAGS = {
    "--data": "data", "--device": "device", "--precision": "precision", "--threads": "threads",
    "--deterministic": "deterministic", "--allow-tf32": "allow_tf32", "--train-subset": "train_subset",
    "--test-subset": "test_subset", "--measure-warmup-steps": "warmup_steps",
    "--max-steps-per-epoch": "max_steps_per_epoch", "--nnodes": "nnodes", "--lr-scaling": "lr_scaling",
    "--collective-timeout": "collective_timeout_s", "--eval-every-steps": "eval_every_steps",
    "--target-accuracy": "target_accuracy",
}
SWITCHES_OFF = ("--no-nesterov", "--no-augment")  # store_false: given = the field is False
CHANNELS_LAST = {"auto": None, "on": True, "off": False}
DEFAULT_BACKENDS = "torch,tensorflow"


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def field_flags() -> dict[str, str]:
    """Recipe / RunSpec field -> the flag that sets it (what a ConfigError about that field names)."""
    flags: dict[str, str] = {"seed": "--seeds", "mode": "--mode", "style": "--style",
                             "channels_last": "--channels-last", "nproc": "--nproc"}
    for flag, fields in [*RECIPE_FLAGS.items(), *SPEC_FLAGS.items()]:
        for name in (fields if isinstance(fields, tuple) else (fields,)):
            flags[name] = flag
    return flags


def _default(cls: type, name: str) -> Any:
    return next(f for f in dataclasses.fields(cls) if f.name == name).default


def add_alias(parser: argparse.ArgumentParser, old: str, new: str, **kwargs: Any) -> None:
    """``old`` still parses as ``new`` (same dest and type), hidden from --help."""
    parser.add_argument(old, dest=_dest(new), help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)


def _float_pair(text: str) -> tuple[float, float]:
    try:
        first, second = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers B1,B2 like 0.9,0.999, got {text!r}") from None
    return first, second


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_selection_options(parser: argparse.ArgumentParser, run_order: bool = True) -> None:
    """--models and --backends."""
    parser.add_argument("--models", required=True,
                        help="comma-separated model names or globs, or 'all' (see `dualbench list`); required")
    order = "runs alternate between them in ABBA order" if run_order else "each is measured in turn"
    parser.add_argument("--backends", default=DEFAULT_BACKENDS,
                        help=f"comma-separated backends; {order} (default {DEFAULT_BACKENDS})")


def add_execution_options(parser: argparse.ArgumentParser) -> None:
    """Where and how steps execute, shared by `run` and `bench`: device, mode, threads, layout, warm-up steps."""
    p = parser.add_argument
    p("--device", default=None, help="auto | cpu | cuda | cuda:N (default auto: the first GPU, else the CPU)")
    p("--mode", default="auto",
      help="execution mode: auto (default: the configuration measured fastest and correct on this machine, "
           "cached; see `dualbench tune`), best (a fixed fallback, no measuring), one mode for every backend, "
           "or per backend 'torch=compile,tensorflow=xla' (a pinned backend is not searched); modes: "
           + "; ".join(f"{b}: {'/'.join(m)}" for b, m in BACKEND_MODES.items()))
    p("--style", default="custom",
      help="execution style(s), comma-separated: custom (the hand-written training step, every backend) and/or "
           "fit (Keras's model.compile + model.fit on the same pipeline, for "
           f"{', '.join(b for b, s in BACKEND_STYLES.items() if 'fit' in s)}); 'custom,fit' runs both and "
           "reports fit over custom; a backend without a requested style runs custom (default custom)")
    p("--threads", type=int, default=None,
      help="intra-op threads for both frameworks (default: every core this process may use)")
    p("--channels-last", choices=tuple(CHANNELS_LAST), default="auto",
      help="torch memory format (default auto: the search or the fallback decides; on/off pins it)")
    p("--measure-warmup-steps", type=int, default=None, metavar="STEPS",
      help="training steps after the compile step that are left out of the throughput figure "
           f"(default {_default(RunSpec, 'warmup_steps')}; not the learning-rate warm-up)")
    add_alias(parser, "--warmup-steps", "--measure-warmup-steps", type=int)


def add_spec_options(parser: argparse.ArgumentParser) -> None:
    """Where and how a run executes: data, precision, determinism, subsets, step caps, plus the execution ones."""
    p = parser.add_argument
    p("--data", default=None, metavar="SPEC",
      help=f"dataset SPEC (default {_default(RunSpec, 'data')}; see `dualbench list`)")
    p("--precision", default=None, choices=PRECISIONS,
      help=f"compute precision (default {_default(RunSpec, 'precision')})")
    add_execution_options(parser)
    p("--deterministic", action="store_true", default=None,
      help="framework determinism switches, slower (default off)")
    p("--allow-tf32", action="store_true", default=None,
      help="allow TensorFloat-32 matmuls/convolutions on Ampere+ GPUs (default off, on both frameworks)")
    p("--train-subset", type=int, default=None, metavar="IMAGES",
      help="stratified training subset size, in images (default: the whole training split)")
    p("--test-subset", type=int, default=None, metavar="IMAGES",
      help="stratified test subset size, in images (default: the whole test split)")
    p("--max-steps-per-epoch", type=int, default=None, metavar="STEPS",
      help="cap on training steps per epoch, for smoke runs (default: no cap)")


def add_tune_options(parser: argparse.ArgumentParser) -> None:
    """--retune and --tune-budget-s: how --mode auto searches (compare.tune)."""
    from compare.tune import DEFAULT_BUDGET_S

    parser.add_argument("--retune", action="store_true",
                        help="--mode auto: search again even if this machine has a cached result (and even for "
                             "a short run); the new result replaces the cached one (default: reuse the cached result)")
    parser.add_argument("--tune-budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="seconds all the searches of this command may take together, shared equally among the "
                             "(backend, model) searches still to run; a search starts no candidate that would end "
                             "after its share (default %(default)s)")


def check_tune_budget(args: argparse.Namespace) -> None:
    if args.tune_budget_s <= 0:
        raise ConfigError(f"--tune-budget-s must be a positive number of seconds, got {args.tune_budget_s:g}")


def add_distributed_options(parser: argparse.ArgumentParser, nproc_default: str = "1") -> None:
    """Data-parallel runs on each framework's own engine (README "Scale-out"); the same flags on every host."""
    p = parser.add_argument
    p("--nproc", default=nproc_default, metavar="N[,N...]",
      help="data-parallel processes per host, or a list (1,2,4) to run each; --batch-size is per process, the "
           f"global batch is that x the world size (default {nproc_default})")
    p("--nnodes", type=int, default=None, metavar="HOSTS",
      help="hosts taking part; start dualbench on each with the same flags (default 1)")
    p("--node-rank", type=int, default=0, metavar="R",
      help="this host's index among --nnodes; host 0 writes the results (default 0)")
    p("--master-addr", default=None, metavar="HOST",
      help="address of host 0, reachable from every host (default 127.0.0.1)")
    p("--master-port", type=int, default=None, metavar="PORT",
      help="one host: torch's store port, replaced when busy (default: a free one); several hosts: where "
           "they meet (required)")
    p("--lr-scaling", choices=LR_SCALING, default=None,
      help="learning rate of a data-parallel run: none (as given) or linear (x world size) (default "
           f"{_default(RunSpec, 'lr_scaling')})")
    p("--collective-timeout", type=float, default=None, metavar="SECONDS",
      help="seconds a collective may wait for the other replicas before the run fails (default "
           f"{_default(RunSpec, 'collective_timeout_s'):g})")


def parse_nprocs(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4] (positive, distinct)."""
    values: list[int] = []
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        if not part.isdigit() or int(part) < 1:
            raise ConfigError(f"--nproc takes positive integers like 1,2,4; got {part!r}", "nproc")
        if int(part) in values:
            raise ConfigError(f"--nproc lists {part} twice", "nproc")
        values.append(int(part))
    if not values:
        raise ConfigError("no process count given; try --nproc 2", "nproc")
    return values


def launch_from_args(args: argparse.Namespace) -> Any:
    """compare.launch.Launch from the host flags, checked (one line naming the fix otherwise)."""
    from compare.launch import Launch

    nnodes = 1 if args.nnodes is None else args.nnodes
    if nnodes < 1 or not 0 <= args.node_rank < nnodes:
        raise ConfigError(f"--node-rank {args.node_rank} must be in 0..{nnodes - 1} (fix --node-rank or --nnodes)")
    if args.master_port is not None and not 0 < args.master_port < 65536:
        raise ConfigError(f"--master-port {args.master_port} is not a port number (1-65535)")
    if nnodes > 1 and (args.master_addr is None or args.master_port is None):
        raise ConfigError("--nnodes > 1 needs --master-addr HOST --master-port PORT (host 0's address, "
                          "the same on every host)")
    if nnodes > 1 and getattr(args, "checkpoint", False):
        raise ConfigError("--checkpoint with --nnodes > 1 is not supported (every host would need host 0's "
                          "checkpoint files): drop --checkpoint")
    return Launch(nnodes=nnodes, node_rank=args.node_rank, master_addr=args.master_addr or "127.0.0.1",
                  master_port=args.master_port)


def add_recipe_options(parser: argparse.ArgumentParser) -> None:
    """The training recipe; defaults shown are the Recipe dataclass defaults."""
    p = parser.add_argument
    r = Recipe()
    p("--epochs", type=int, default=None, help=f"training epochs (default {r.epochs})")
    p("--batch-size", type=int, default=None, metavar="IMAGES",
      help=f"training images per step (default {r.batch_size})")
    p("--eval-batch-size", type=int, default=None, metavar="IMAGES",
      help=f"test images per evaluation step; does not change results (default {r.eval_batch_size})")
    p("--lr", type=float, default=None, help=f"peak learning rate, per step (default {r.lr})")
    p("--optimizer", choices=OPTIMIZERS, default=None, help=f"optimizer (default {r.optimizer})")
    p("--schedule", choices=SCHEDULES, default=None, help=f"LR schedule, set every step (default {r.schedule})")
    p("--lr-warmup-epochs", type=float, default=None, metavar="EPOCHS",
      help=f"linear learning-rate warm-up from 0, in epochs (default {r.warmup_epochs}; not "
           "--measure-warmup-steps)")
    add_alias(parser, "--warmup-epochs", "--lr-warmup-epochs", type=float)
    p("--weight-decay", type=float, default=None, help=f"weight decay coefficient (default {r.weight_decay})")
    p("--wd-mode", choices=WEIGHT_DECAY_MODES, default=None,
      help=f"weight-decay semantics: coupled_l2 adds wd*w to the gradient, decoupled scales w by 1-lr*wd "
           f"(default {r.weight_decay_mode})")
    p("--decay-bn-and-bias", action=argparse.BooleanOptionalAction, default=None,
      help="weight decay on BN parameters and biases too; --no-decay-bn-and-bias: conv/dense kernels only "
           f"(default {'on' if r.decay_bn_and_bias else 'off'})")
    p("--momentum", type=float, default=None, help=f"SGD momentum, torch semantics (default {r.momentum})")
    p("--no-nesterov", action="store_false", default=None,
      help="plain SGD momentum instead of Nesterov (default Nesterov)")
    p("--adam-betas", type=_float_pair, default=None, metavar="B1,B2",
      help=f"Adam/AdamW moment decays (default {r.adam_beta1},{r.adam_beta2})")
    p("--adam-epsilon", type=float, default=None,
      help=f"Adam/AdamW epsilon, added after sqrt(v_hat) (default {r.adam_epsilon})")
    p("--label-smoothing", type=float, default=None,
      help=f"cross-entropy label smoothing in [0, 1) (default {r.label_smoothing})")
    p("--dropout", type=float, default=None, metavar="RATE",
      help="dropout rate in [0, 1) of models with a dropout layer (mobilenet_v2) (default: the architecture's)")
    p("--init", choices=INIT_SCHEMES, default=None, help=f"initial-weights scheme (default {r.init_scheme})")
    p("--bn-momentum", type=float, default=None,
      help=f"BatchNorm momentum, torch convention; Keras gets 1 - m (default {r.bn_momentum})")
    p("--bn-epsilon", type=float, default=None, help=f"BatchNorm epsilon (default {r.bn_epsilon})")
    p("--no-augment", action="store_false", default=None,
      help="no random crop / flip; the sampler still fixes the order (default: augment)")
    p("--crop-padding", type=int, default=None, metavar="PIXELS",
      help="zero padding before the random crop (default: per dataset, an eighth of the image side)")
    p("--hflip", action=argparse.BooleanOptionalAction, default=None,
      help="random horizontal flips; --no-hflip: none (default: per dataset, off for MNIST digits)")
    p("--mean", type=_floats, default=None, metavar="M[,M,M]",
      help="normalisation mean per channel, in [0, 1] (default: the dataset's training-set mean)")
    p("--std", type=_floats, default=None, metavar="S[,S,S]",
      help="normalisation std per channel, in [0, 1] (default: the dataset's training-set std)")


def add_evaluation_options(parser: argparse.ArgumentParser) -> None:
    """Time to accuracy: evaluations within epochs and the target accuracy."""
    p = parser.add_argument
    p("--eval-every-steps", type=int, default=None, metavar="STEPS",
      help="also evaluate every STEPS optimiser steps (global steps in a data-parallel run, where the chief "
           "evaluates), never counted as training time (default: at epoch ends only)")
    p("--target-accuracy", type=float, default=None, metavar="FRACTION",
      help="test accuracy as a fraction in (0, 1], e.g. 0.85 for 85%%, for time to accuracy: the training "
           "wall-clock in seconds (evaluation excluded) at the first evaluation that reaches it, as DAWNBench / "
           "MLPerf; in the head to head, the report and the scaling table (default: none, those columns stay "
           "n/a)")


def name_the_flag(exc: ConfigError) -> ConfigError:
    """``exc`` with '(fix --flag)' appended, the flag found from the field it carries (never from its text)."""
    flag = field_flags().get(exc.field or "")
    return ConfigError(f"{exc} (fix {flag})", exc.field) if flag else exc


def explicit_recipe_fields(args: argparse.Namespace) -> dict[str, Any]:
    """{Recipe field: value} of every field the user set on the command line (they win over the
    per-dataset defaults of common.data.defaults)."""
    given: dict[str, Any] = {}
    for flag, fields in RECIPE_FLAGS.items():
        value = getattr(args, _dest(flag), None)
        if value is not None:
            given.update(zip(fields, value) if isinstance(fields, tuple) else {fields: value})
    return given


def build_recipe(args: argparse.Namespace) -> Recipe:
    """The Recipe from the recipe options (dataclass defaults for options not given).

    A --mean or --std given without the other is left to common.data.defaults.apply_defaults,
    which pairs it with the dataset's value for the other.
    """
    given = explicit_recipe_fields(args)
    if len({"mean", "std"} & set(given)) == 1:
        given.pop("mean", None), given.pop("std", None)
    try:
        return Recipe(**given)
    except ConfigError as exc:
        raise name_the_flag(exc) from None


def parse_backends(text: str) -> list[str]:
    """Comma list -> known backend names, in the given order, without duplicates."""
    names = [part.strip() for part in str(text).split(",") if part.strip()]
    if not names:
        raise ConfigError("no backend given; try --backends torch,tensorflow")
    if len(set(names)) != len(names):
        raise ConfigError(f"--backends lists a backend twice: {text!r}")
    keras_backend = os.environ.get("KERAS_BACKEND")
    for name, wanted in (("tensorflow", "tensorflow"), ("keras-torch", "torch")):
        if name in names and keras_backend and keras_backend != wanted:
            raise ConfigError(f"KERAS_BACKEND={keras_backend} is set in your environment, but the {name} "
                              f"backend runs Keras on {wanted}: unset KERAS_BACKEND (dualbench sets it per worker)")
    return [check_backend(name) for name in names]


def parse_styles(text: str, backends: list[str]) -> list[tuple[str, str]]:
    """--style -> the (backend, style) series to run, in backend order; a backend that has none of the
    requested styles runs "custom" (torch has only that); a style no selected backend has is an error."""
    styles = list(dict.fromkeys(part.strip() for part in str(text or "custom").split(",") if part.strip()))
    for style in styles or ["<empty>"]:
        if style not in STYLES:
            raise ConfigError(f"unknown --style {style!r}; choose from: {', '.join(STYLES)} (or custom,fit)")
    series = []
    for backend in backends:
        available = BACKEND_STYLES.get(backend, ("custom",))
        series += [(backend, style) for style in styles if style in available] or [(backend, "custom")]
    for style in styles:
        if not any(s == style for _, s in series):
            owners = ", ".join(b for b, s in BACKEND_STYLES.items() if style in s)
            raise ConfigError(f"--style {style}: none of --backends {','.join(backends)} has it (it exists for "
                              f"{owners}); add one of those backends or drop --style {style}")
    return series


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
    text = str(text or "auto").strip()
    if "=" not in text:
        mismatched = [b for b in backends if b in BACKEND_MODES and text not in BACKEND_MODES[b]]
        if mismatched:
            b = mismatched[0]
            raise ConfigError(f"--mode {text} does not exist for {b} (it has {', '.join(BACKEND_MODES[b])}); "
                              f"give modes per backend, e.g. --mode torch=compile,tensorflow=xla")
        return {b: text for b in backends}
    modes = {b: "auto" for b in backends}
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
    kwargs = {field: getattr(args, _dest(flag)) for flag, field in SPEC_FLAGS.items()
              if getattr(args, _dest(flag), None) is not None}
    kwargs["channels_last"] = CHANNELS_LAST[getattr(args, "channels_last", "auto") or "auto"]
    return kwargs


def make_spec(model: str, backend: str, seed: int, mode: str, recipe: Recipe, shared: dict[str, Any],
              checkpoint_dir: str | None = None, style: str = "custom", nproc: int = 1) -> RunSpec:
    """One validated RunSpec (ConfigError names the flag to fix)."""
    try:
        return RunSpec(model=model, backend=backend, seed=seed, mode=mode, style=style, recipe=recipe,
                       checkpoint_dir=checkpoint_dir, nproc=nproc, **shared)
    except ConfigError as exc:
        raise name_the_flag(exc) from None


def parse_selection(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(models, backends) from --models / --backends."""
    return parse_models(args.models), parse_backends(args.backends)


def parse_in_shape(text: str) -> tuple[int, int, int]:
    """--in-shape "H,W,C" -> (H, W, C) of positive ints; ConfigError naming the flag otherwise."""
    try:
        h, w, c = (int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--in-shape must be H,W,C like 32,32,3, got {text!r}") from None
    if min(h, w, c) <= 0:
        raise ConfigError(f"--in-shape must be positive, got {text!r}")
    return h, w, c
