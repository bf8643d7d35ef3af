"""The CLI reads the same everywhere: one name per concept, help with units and defaults, errors naming the flag."""
from __future__ import annotations

import argparse
import dataclasses
import re
import shlex

import pytest

from common.config import INIT_SCHEMES, Recipe, RunSpec
from common.errors import ConfigError
from compare import options
from compare.command_line import command_for
from compare.cli import build_parser
from tests.runner_helpers import fake_env, launches, run_cli  # noqa: F401

# A value each flag rejects. Every non-switch flag of `run` that sets a Recipe/RunSpec field must be here.
BAD_FLAG_VALUES = {
    "--epochs": "0", "--batch-size": "-1", "--eval-batch-size": "0", "--lr": "0", "--optimizer": "lion",
    "--schedule": "linear", "--lr-warmup-epochs": "99", "--weight-decay": "-1", "--wd-mode": "l1",
    "--momentum": "1.5", "--adam-betas": "0.9,1.0", "--adam-epsilon": "0", "--label-smoothing": "1",
    "--dropout": "1.0", "--init": "zeros", "--bn-momentum": "-0.1", "--bn-epsilon": "0",
    "--data": "folder:/nonexistent",
    "--device": "tpu", "--precision": "fp8", "--threads": "0", "--train-subset": "0", "--test-subset": "-3",
    "--measure-warmup-steps": "-1", "--max-steps-per-epoch": "0",
    "--nnodes": "0", "--lr-scaling": "sqrt", "--collective-timeout": "0",
    "--crop-padding": "-1", "--mean": "0.5,0.5", "--std": "0,0,0", "--eval-every-steps": "0",
    "--target-accuracy": "1.5",
}
SWITCHES = {"--no-nesterov", "--no-augment", "--decay-bn-and-bias", "--deterministic", "--allow-tf32", "--hflip"}
# A value each dataclass field rejects (the field the ConfigError must carry).
BAD_FIELD_VALUES = {
    Recipe: {"epochs": 0, "batch_size": 0, "eval_batch_size": -2, "lr": 0.0, "optimizer": "lion",
             "schedule": "linear", "warmup_epochs": 99.0, "weight_decay": -1.0, "weight_decay_mode": "l1",
             "momentum": 1.0, "adam_beta1": 1.0, "adam_beta2": -0.1, "adam_epsilon": 0.0, "label_smoothing": 1.0,
             "dropout": 1.0, "init_scheme": "zeros", "bn_momentum": 1.0, "bn_epsilon": 0.0, "crop_padding": -1,
             "std": (0.2, 0.0, 0.2), "step_gamma": 0.0, "step_milestones": (0.5, 1.5), "onecycle_pct_start": 1.0,
             "final_lr_fraction": -0.1, "defaulted_fields": ("crop_padding", "lr")},
    RunSpec: {"device": "tpu", "mode": "warp", "precision": "fp8", "threads": 0, "train_subset": 0, "test_subset": 0,
              "warmup_steps": -1, "max_steps_per_epoch": 0, "seed": -1, "style": "fit", "nproc": 0, "nnodes": 0,
              "lr_scaling": "sqrt", "collective_timeout_s": 0.0, "eval_every_steps": 0,
              "target_accuracy": 1.5},
}


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


def test_every_bad_flag_value_is_refused_naming_that_flag(fake_env, tmp_path, capsys):
    flags = set(options.RECIPE_FLAGS) | set(options.SPEC_FLAGS)
    assert flags - SWITCHES == set(BAD_FLAG_VALUES), "a new flag needs a bad value here"
    for flag, value in BAD_FLAG_VALUES.items():
        code = run_cli("run", "--models", "seed_cnn", "--backends", "fakea", "--data", "synthetic:64,32",
                       "--batch-size", "16", flag, value, "--out", str(tmp_path / "out"))
        line = _one_error_line(capsys)
        assert code == 2 and line.startswith("dualbench: error:"), (flag, line)
        assert set(re.findall(r"--[a-z][a-z0-9-]*", line)) - {"--help"} == {flag}, (flag, line)  # that flag only
    assert launches(fake_env) == []


def test_bn_epsilon_zero_names_bn_epsilon_not_adam_epsilon(fake_env, tmp_path, capsys):
    assert run_cli("run", "--models", "seed_cnn", "--bn-epsilon", "0", "--out", str(tmp_path / "out")) == 2
    line = _one_error_line(capsys)
    assert "(fix --bn-epsilon)" in line and "adam" not in line


@pytest.mark.parametrize("cls", [Recipe, RunSpec])
def test_every_field_validation_error_carries_its_field_and_maps_to_its_flag(cls):
    base = {} if cls is Recipe else {"model": "seed_cnn", "backend": "torch"}
    flags = options.field_flags()
    for name, value in BAD_FIELD_VALUES[cls].items():
        with pytest.raises(ConfigError) as caught:
            cls(**base, **{name: value})
        assert caught.value.field == name, (name, str(caught.value))
        named = options.name_the_flag(caught.value)
        assert (f"(fix {flags[name]})" in str(named)) if name in flags else str(named) == str(caught.value)
    # every validated field is covered: a field whose default is valid and that a bad value exists for
    checked = {f.name for f in dataclasses.fields(cls)} - {"nesterov", "augment", "drop_last", "decay_bn_and_bias",
                                                          "mean", "model", "backend", "data",
                                                          "channels_last", "deterministic", "allow_tf32",
                                                          "checkpoint_dir", "final_weights_path", "recipe",
                                                          "horizontal_flip", "defaults_source",
                                                          "execution"}  # resolved by the parent, not a flag
    assert checked == set(BAD_FIELD_VALUES[cls])


def _visible_options(parser: argparse.ArgumentParser, path: str = "dualbench") -> dict[str, list]:
    """'dualbench run' -> its visible optional actions (help not suppressed), every subcommand, nested too."""
    found = {path: [a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS
                    and not isinstance(a, argparse._HelpAction)]}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(_visible_options(sub, f"{path} {name}"))
    return found


def test_every_flag_has_help_stating_its_default():
    for command, actions in _visible_options(build_parser()).items():
        for action in actions:
            text = (action.help or "").lower()
            assert "default" in text or action.required, f"{command} {action.option_strings[0]}: {action.help!r}"


def test_one_name_per_concept_across_subcommands_and_old_spellings_still_parse():
    visible = {s for actions in _visible_options(build_parser()).values() for a in actions for s in a.option_strings}
    for old in ("--batch", "--batch-sizes", "--seed", "--precisions", "--warmup-steps", "--warmup-epochs"):
        assert old not in visible, old
    for new in ("--batch-size", "--seeds", "--precision", "--measure-warmup-steps", "--lr-warmup-epochs"):
        assert new in visible, new
    parser = build_parser()
    args = parser.parse_args(["bench", "--models", "x", "--batch-sizes", "16,32", "--precisions", "bf16",
                              "--warmup-steps", "2"])
    assert (args.batch_size, args.precision, args.measure_warmup_steps) == ("16,32", "bf16", 2)
    args = parser.parse_args(["parity", "--batch", "4", "--seed", "3"])
    assert (args.batch_size, args.seeds) == (4, "3")
    args = parser.parse_args(["run", "--models", "x", "--out", "o", "--seed", "1", "--warmup-epochs", "0.5"])
    assert (args.seeds, args.lr_warmup_epochs) == ("1", 0.5)


def test_parity_init_takes_the_same_choices_as_run_init_and_backends_help_is_not_stale():
    commands = _visible_options(build_parser())
    init = {cmd: next(a for a in actions if "--init" in a.option_strings).choices
            for cmd, actions in commands.items() if any("--init" in a.option_strings for a in actions)}
    assert {"dualbench run", "dualbench parity", "dualbench export", "dualbench scale"} <= set(init)  # scale takes run's options
    assert all(tuple(choices) == INIT_SCHEMES for choices in init.values())
    backends = next(a for a in commands["dualbench run"] if "--backends" in a.option_strings)
    assert "ABBA" in backends.help and "in run order" not in backends.help


def test_new_recipe_flags_reach_the_recipe_and_the_reproducing_command():
    parser = build_parser()
    argv = ["run", "--models", "resnet20", "--out", "o", "--no-decay-bn-and-bias", "--eval-batch-size", "250",
            "--adam-betas", "0.8,0.99", "--dropout", "0.1", "--lr-warmup-epochs", "1", "--optimizer", "adam"]
    recipe = options.build_recipe(parser.parse_args(argv))
    assert (recipe.decay_bn_and_bias, recipe.eval_batch_size, recipe.dropout) == (False, 250, 0.1)
    assert (recipe.adam_beta1, recipe.adam_beta2, recipe.warmup_epochs) == (0.8, 0.99, 1.0)
    spec = RunSpec(model="resnet20", backend="torch", recipe=recipe)
    command = command_for([spec.to_dict()], "o")
    for words in ("--no-decay-bn-and-bias", "--eval-batch-size 250", "--adam-betas 0.8,0.99", "--dropout 0.1",
                  "--lr-warmup-epochs 1.0"):
        assert words in command, command
    again = options.build_recipe(parser.parse_args(shlex.split(command)[1:]))
    assert again == recipe  # the manifest's command reproduces the recipe
    assert options.build_recipe(parser.parse_args(["run", "--models", "x", "--out", "o",
                                                   "--decay-bn-and-bias"])).decay_bn_and_bias is True
