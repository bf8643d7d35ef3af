"""Per-dataset augmentation and normalisation defaults: chosen per dataset, recorded, and a flag always wins."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from common.config import CIFAR_MEAN, CIFAR_STD, Recipe, RunSpec
from common.data import idx as data_idx
from common.data import load_dataset
from common.data.defaults import apply_defaults, channel_stats, check_channels, crop_padding_for, dataset_defaults
from common.errors import ConfigError, DataError
from common.sampler import epoch_plan
from tests import data_fixtures as fx
from tests.runner_helpers import fake_env, rows, run_cli  # noqa: F401
from tests.torch_helpers import tiny_dataset


def _data(shape, n_train=16):
    return tiny_dataset(n_train=n_train, n_test=4, shape=shape)


@pytest.mark.parametrize("spec, shape, flip, mean", [
    ("fashion_mnist", (28, 28, 1), True, (0.2860,)), ("fashion_mnist:/x", (28, 28, 1), True, (0.2860,)),
    ("tfds:fashion_mnist", (28, 28, 1), True, (0.2860,)), ("mnist:/x", (28, 28, 1), False, (0.1307,)),
    ("tfds:mnist", (28, 28, 1), False, (0.1307,)), ("cifar10:/x", (32, 32, 3), True, CIFAR_MEAN),
    ("tfds:cifar10", (32, 32, 3), True, CIFAR_MEAN)])
def test_known_datasets_get_their_published_statistics_and_flip_choice(spec, shape, flip, mean):
    defaults = dataset_defaults(spec, _data(shape))
    assert (defaults.mean, defaults.horizontal_flip, defaults.crop_padding) == (mean, flip, shape[0] // 8)
    assert defaults.source == {"(0.286,)": "fashion_mnist", "(0.1307,)": "mnist"}.get(str(mean), "cifar10")


def test_crop_padding_is_an_eighth_of_the_shorter_side():
    assert [crop_padding_for(s) for s in [(32, 32, 3), (28, 28, 1), (64, 48, 3), (6, 6, 3)]] == [4, 3, 6, 1]


def test_unknown_datasets_are_normalised_with_their_own_training_statistics():
    data = _data((8, 6, 3), n_train=40)
    data.train_images[..., 2] //= 4  # a dim blue channel: per-channel statistics differ
    defaults = dataset_defaults("folder:/somewhere", data)
    x = data.train_images.astype(np.float64) / 255
    np.testing.assert_allclose(defaults.mean, x.mean(axis=(0, 1, 2)), atol=5e-5)
    np.testing.assert_allclose(defaults.std, x.std(axis=(0, 1, 2)), atol=5e-5)
    assert defaults.horizontal_flip and defaults.crop_padding == 1 and "computed" in defaults.source
    assert channel_stats(data.train_images, chunk=7) == channel_stats(data.train_images)  # chunking changes nothing


def test_a_known_name_with_the_wrong_channel_count_is_refused():
    with pytest.raises(DataError, match="not that dataset"):
        dataset_defaults("mnist:/x", _data((28, 28, 3)))


def test_flags_win_and_the_recipe_records_what_the_dataset_filled():
    defaults = dataset_defaults("mnist", _data((28, 28, 1)))
    recipe = apply_defaults(Recipe(), defaults, {"horizontal_flip": True, "crop_padding": 2})
    assert (recipe.horizontal_flip, recipe.crop_padding, recipe.mean, recipe.std) == (True, 2, (0.1307,), (0.3081,))
    assert recipe.defaulted_fields == ("mean", "std") and recipe.defaults_source == "mnist"
    untouched = apply_defaults(Recipe(), defaults, {"mean": (0.5,), "std": (0.5,), "crop_padding": 1,
                                                    "horizontal_flip": False})
    assert untouched.defaulted_fields == () and untouched.defaults_source == ""
    with pytest.raises(ConfigError, match="--mean gives 3 value"):
        apply_defaults(Recipe(), defaults, {"mean": CIFAR_MEAN})  # three means for one channel


def test_worker_refuses_a_recipe_for_other_channels():
    check_channels(Recipe(mean=(0.5,), std=(0.2,)), (28, 28, 1))
    with pytest.raises(ConfigError, match="normalises 3 channel"):
        check_channels(Recipe(), (28, 28, 1))


def test_no_flip_plans_keep_the_order_and_the_crops():
    flipping, plain = epoch_plan(5, 2, 300, 32, crop_padding=3), epoch_plan(5, 2, 300, 32, crop_padding=3,
                                                                         horizontal_flip=False)
    assert flipping.flips.any() and not plain.flips.any() and not plain.horizontal_flip and plain.random_crop
    np.testing.assert_array_equal(flipping.order, plain.order)
    np.testing.assert_array_equal(flipping.crop_offsets, plain.crop_offsets)
    assert plain.crop_offsets.max() == 6 and plain.crop_offsets.min() == 0  # pad 3: offsets 0..6


@pytest.mark.parametrize("recipe", [dict(horizontal_flip=False, crop_padding=3, mean=(0.1307,), std=(0.3081,)),
                                    dict(augment=False, mean=(0.2860,), std=(0.3530,))])
def test_both_real_pipelines_report_the_same_augmentation_and_normalisation(recipe):
    from common.registry import get_backend

    data = _data((28, 28, 1))
    reported = {}
    for name in ("torch", "tensorflow"):
        backend = get_backend(name)
        spec = RunSpec(model="resnet20", backend=name, device="cpu", threads=1, recipe=Recipe(batch_size=8, **recipe))
        backend.setup(spec)
        backend.attach_data(data, spec)
        settings = backend._pipeline_settings()  # what audit() reports from the built pipelines
        reported[name] = {k: settings[k] for k in ("augmentation", "input_normalization", "crop_padding")}
    assert reported["torch"] == reported["tensorflow"]
    expected = "random crop (pad 3)" if recipe.get("augment", True) else "none"
    assert reported["torch"]["augmentation"] == expected
    assert reported["torch"]["input_normalization"] == f"mean ({recipe['mean'][0]:g}) std ({recipe['std'][0]:g})"


@pytest.fixture
def small_idx(monkeypatch, tmp_path):
    for name, dataset in list(data_idx.IDX_DATASETS.items()):
        monkeypatch.setitem(data_idx.IDX_DATASETS, name, dataclasses.replace(dataset, counts=(64, 32)))
    fx.write_idx_files(tmp_path / "idx", fx.idx_arrays(64, 32))
    return tmp_path / "idx"


@pytest.mark.parametrize("prefix, extra, expected", [
    ("mnist", [], dict(horizontal_flip=False, crop_padding=3, mean=[0.1307], augment=True,
                       defaulted_fields=["crop_padding", "horizontal_flip", "mean", "std"])),
    ("fashion_mnist", ["--no-hflip", "--crop-padding", "2", "--mean", "0.5"],
     dict(horizontal_flip=False, crop_padding=2, mean=[0.5], std=[0.353], defaulted_fields=["std"])),
    ("mnist", ["--no-augment"], dict(augment=False, horizontal_flip=False)),
], ids=["mnist", "flags_win", "no_augment_wins"])
def test_run_records_the_dataset_defaults_in_every_runs_recipe(fake_env, small_idx, tmp_path, prefix,  # noqa: F811
                                                               extra, expected):
    out = tmp_path / "out"
    code = run_cli("run", "--models", "seed_cnn", "--backends", "fakea", "--seeds", "0,1", "--data",
                   f"{prefix}:{small_idx}", "--batch-size", "16", "--epochs", "1", "--warmup-steps", "1", *extra,
                   "--out", str(out))
    assert code == 0
    recipes = [row["spec"]["recipe"] for row in rows(out).values()]
    assert len(recipes) == 2 and recipes[0] == recipes[1]
    for key, value in expected.items():
        assert recipes[0][key] == value, key
    assert recipes[0]["defaults_source"] == (prefix if recipes[0]["defaulted_fields"] else "")
    report = (out / "report.md").read_text()
    assert "recipe.defaulted_fields" in report and "recipe.horizontal_flip" in report
    command = __import__("json").loads((out / "manifest.json").read_text())["command"]
    for flag in extra:  # the reproducing command repeats the flags, not the dataset's defaults
        assert flag in command
    assert ("--mean" in command) == ("--mean" in extra) and "--std" not in command
