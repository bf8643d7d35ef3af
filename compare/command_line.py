"""The `dualbench run` command line that reproduces a set of runs (for the manifest and the report).

Built from the RunSpec dicts the runs recorded: only what differs from the defaults is spelled out, and
recipe fields the dataset's defaults filled are left for the same data to fill again.
"""
from __future__ import annotations

import dataclasses
import shlex
from typing import Any

from common.config import STYLES, Recipe, RunSpec
from compare.options import RECIPE_FLAGS, SPEC_FLAGS, SWITCHES_OFF


def command_for(specs: list[dict[str, Any]], out: str | None = None) -> str:
    """The `dualbench run` command line that reproduces runs with these specs (RunSpec dicts)."""
    if not specs:
        return "dualbench run"
    models = list(dict.fromkeys(s["model"] for s in specs))
    backends = list(dict.fromkeys(s["backend"] for s in specs))
    seeds = sorted({int(s["seed"]) for s in specs})
    nprocs = list(dict.fromkeys(int(s.get("nproc", 1)) for s in specs))
    words = ["dualbench", "run", "--models", ",".join(models), "--backends", ",".join(backends),
             "--seeds", ",".join(map(str, seeds))]
    if nprocs != [1]:
        words += ["--nproc", ",".join(map(str, nprocs))]
    modes = {s["backend"]: s.get("mode", "auto") for s in specs}
    if set(modes.values()) != {"auto"}:
        distinct = set(modes.values())
        words += ["--mode", distinct.pop() if len(distinct) == 1 else ",".join(f"{b}={m}" for b, m in modes.items())]
    styles = list(dict.fromkeys(s.get("style", "custom") for s in specs))
    if styles != ["custom"]:
        words += ["--style", ",".join(sorted(styles, key=STYLES.index))]
    first, defaults = specs[0], RunSpec(model="x", backend="x").to_dict()
    for flag, name in SPEC_FLAGS.items():
        value = first.get(name, defaults[name])
        if value != defaults[name]:
            words += [flag] if isinstance(value, bool) else [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    channels = first.get("channels_last")
    if channels is not None:
        words += ["--channels-last", "on" if channels else "off"]
    words += _recipe_words(first.get("recipe", {}))
    if first.get("checkpoint_dir"):
        words.append("--checkpoint")
    if out:
        words += ["--out", str(out)]
    return shlex.join(words)


def _recipe_words(recipe: dict[str, Any]) -> list[str]:
    """The recipe flags that reproduce ``recipe`` (a Recipe dict): only values that differ from the defaults
    and that the dataset's defaults did not fill (the same data fills them again)."""
    defaults, words = dataclasses.asdict(Recipe()), []
    filled = set(recipe.get("defaulted_fields") or ())
    for flag, fields in RECIPE_FLAGS.items():
        names = fields if isinstance(fields, tuple) else (fields,)
        values = [tuple(v) if isinstance(v, list) else v for v in (recipe.get(n, defaults[n]) for n in names)]
        if values == [defaults[n] for n in names] or filled.issuperset(names):
            continue
        if flag in SWITCHES_OFF:
            words.append(flag)
        elif isinstance(values[0], bool):
            words.append(flag if values[0] else flag.replace("--", "--no-", 1))
        elif isinstance(values[0], tuple):
            words += [flag, ",".join(f"{v:g}" for v in values[0])]
        else:
            words += [flag, ",".join(map(str, values))]
    return words
