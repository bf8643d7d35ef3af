"""common.data API: SPECs, cache, fingerprint, stratified subsets, synthetic data, import purity."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.data import cache as data_cache
from common.data import DATASET_SPECS, Dataset, compute_fingerprint, default_cache_dir, load_dataset, \
    stratified_subset
from common.errors import DataError, UserError
from tests import data_fixtures as fx


def _load(spec, tmp_path, **kwargs):
    return load_dataset(spec, cache_dir=tmp_path / "cache", progress=False, **kwargs)


def _entries(tmp_path):
    return sorted(p.name for p in (tmp_path / "cache" / "datasets").iterdir())


# --- stratified subsets ----------------------------------------------------------------------

def test_stratified_subset_is_deterministic_sorted_int64():
    labels = np.repeat(np.arange(10), 50)
    first = stratified_subset(labels, 100, seed=7)
    assert first.dtype == np.int64 and np.all(np.diff(first) > 0)
    np.testing.assert_array_equal(first, stratified_subset(labels, 100, seed=7))
    assert not np.array_equal(first, stratified_subset(labels, 100, seed=8))
    assert np.bincount(labels[first]).tolist() == [10] * 10


def test_stratified_subset_proportions_use_largest_remainder():
    labels = np.repeat([0, 1, 2], [50, 30, 20])  # 7 -> exact quotas 3.5, 2.1, 1.4
    picked = stratified_subset(labels, 7, seed=0)
    assert np.bincount(labels[picked], minlength=3).tolist() == [4, 2, 1]


def test_stratified_subset_represents_every_class():
    labels = np.repeat([0, 1, 2, 3], [97, 1, 1, 1])  # proportional quotas would drop classes 1-3
    picked = stratified_subset(labels, 4, seed=0)
    assert np.bincount(labels[picked]).tolist() == [1, 1, 1, 1]
    assert len(stratified_subset(labels, 10, seed=0)) == 10


@pytest.mark.parametrize("size", [0, 101])
def test_stratified_subset_rejects_impossible_sizes(size):
    with pytest.raises(DataError):
        stratified_subset(np.zeros(100, dtype=np.int64), size, seed=0)


def test_load_dataset_subsets(tmp_path):
    full = _load("synthetic:200,50", tmp_path)
    sub = _load("synthetic:200,50", tmp_path, train_subset=40, test_subset=20, subset_seed=3)
    assert len(sub.train_labels) == 40 and len(sub.test_labels) == 20
    assert np.bincount(sub.train_labels).tolist() == [4] * 10
    assert sub.fingerprint != full.fingerprint
    assert sub.fingerprint == compute_fingerprint(sub.train_images, sub.train_labels, sub.test_images,
                                                  sub.test_labels, sub.class_names)
    again = _load("synthetic:200,50", tmp_path, train_subset=40, test_subset=20, subset_seed=3)
    assert again.fingerprint == sub.fingerprint


def test_subset_larger_than_split_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="only 50 test images: use --test-subset 50 or less"):
        _load("synthetic:200,50", tmp_path, test_subset=51)


# --- fingerprint -------------------------------------------------------------------------------

def test_fingerprint_tracks_bytes_layout_and_class_names():
    arrays = fx.cifar_arrays()
    parts = [arrays[k] for k in ("train_images", "train_labels", "test_images", "test_labels")]
    base = compute_fingerprint(*parts, fx.CLASSES)
    assert base == compute_fingerprint(*[p.copy() for p in parts], fx.CLASSES)
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    changed = parts[0].copy()
    changed[3, 4, 5, 1] ^= 1
    assert compute_fingerprint(changed, *parts[1:], fx.CLASSES) != base
    assert compute_fingerprint(*parts, fx.CLASSES[::-1]) != base
    reshaped = parts[0].reshape(len(parts[0]), 3, 32, 32)  # same bytes, other layout
    assert compute_fingerprint(reshaped, *parts[1:], fx.CLASSES) != base


# --- cache -------------------------------------------------------------------------------------

def test_cache_hit_then_invalidation_on_change(tmp_path):
    fx.write_image_folder(tmp_path / "imgs")
    spec = f"folder:{tmp_path / 'imgs'}"
    first = _load(spec, tmp_path)
    second = _load(spec, tmp_path)
    assert (first.from_cache, second.from_cache) == (False, True)
    assert first.fingerprint == second.fingerprint
    np.testing.assert_array_equal(first.train_images, second.train_images)
    [entry] = _entries(tmp_path)
    meta = json.loads((tmp_path / "cache" / "datasets" / entry / "meta.json").read_text())
    assert meta["fingerprint"] == first.fingerprint and meta["counts"] == {"train": 9, "test": 6}
    assert meta["class_names"] == ["ant", "bee", "cat"]

    image = tmp_path / "imgs" / "train" / "bee" / "00.png"
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))  # touch
    touched = _load(spec, tmp_path)
    assert touched.from_cache is False and touched.fingerprint == first.fingerprint
    assert len(_entries(tmp_path)) == 1  # the stale entry was pruned

    from PIL import Image
    Image.fromarray(np.zeros((6, 8, 3), dtype=np.uint8)).save(image)  # modify
    modified = _load(spec, tmp_path)
    assert modified.from_cache is False and modified.fingerprint != first.fingerprint
    assert _load(spec, tmp_path).from_cache is True


def test_cifar_archive_cache_invalidates_on_replacement(tmp_path):
    archive = tmp_path / "cifar-10-binary.tar.gz"
    fx.write_archive(fx.write_cifar_binary(tmp_path / "a", fx.cifar_arrays(seed=1)), archive)
    first = _load(f"cifar10:{archive}", tmp_path)
    assert _load(f"cifar10:{archive}", tmp_path).from_cache
    archive.unlink()
    fx.write_archive(fx.write_cifar_binary(tmp_path / "b", fx.cifar_arrays(seed=2)), archive)
    replaced = _load(f"cifar10:{archive}", tmp_path)
    assert replaced.from_cache is False and replaced.fingerprint != first.fingerprint


def test_damaged_cache_entry_is_decoded_again(tmp_path, capsys):
    first = _load("synthetic:100,20", tmp_path)
    [entry] = _entries(tmp_path)
    target = tmp_path / "cache" / "datasets" / entry / "train_images.npy"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF  # same size, one pixel changed: only the fingerprint check can notice
    target.write_bytes(bytes(data))
    again = _load("synthetic:100,20", tmp_path)
    assert again.from_cache is False and again.fingerprint == first.fingerprint
    assert "damaged" in capsys.readouterr().err
    (tmp_path / "cache" / "datasets" / entry / "test_labels.npy").write_bytes(b"truncated")
    assert _load("synthetic:100,20", tmp_path).from_cache is False
    assert not [p for p in (tmp_path / "cache" / "datasets").iterdir() if p.name.startswith(".tmp")]


def test_default_cache_dir_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DUALBENCH_CACHE", str(tmp_path / "explicit"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("DUALBENCH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "dualbench"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path("~/.cache/dualbench").expanduser()


def test_cache_dir_defaults_to_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DUALBENCH_CACHE", str(tmp_path / "env-cache"))
    load_dataset("synthetic:30,10", progress=False)
    assert len(list((tmp_path / "env-cache" / "datasets").iterdir())) == 1


def test_path_signature_tracks_names_sizes_mtimes_and_folders(tmp_path):
    (tmp_path / "tree" / "a").mkdir(parents=True)
    (tmp_path / "tree" / "a" / "x.bin").write_bytes(b"12345")
    signature = data_cache.path_signature(tmp_path / "tree")
    assert data_cache.path_signature(tmp_path / "tree") == signature
    (tmp_path / "tree" / "b").mkdir()  # an empty (class) folder appears
    with_folder = data_cache.path_signature(tmp_path / "tree")
    assert with_folder != signature
    (tmp_path / "tree" / "a" / "x.bin").write_bytes(b"123456")
    assert data_cache.path_signature(tmp_path / "tree") != with_folder


# --- SPECs and synthetic data --------------------------------------------------------------------

def test_synthetic_defaults_are_small_deterministic_and_balanced(tmp_path):
    dataset = _load("synthetic", tmp_path)
    assert isinstance(dataset, Dataset)
    assert dataset.train_images.shape == (2000, 32, 32, 3) and dataset.test_images.shape == (500, 32, 32, 3)
    assert dataset.class_names == tuple(f"class{i}" for i in range(10))
    assert np.bincount(dataset.train_labels).tolist() == [200] * 10
    assert dataset.num_classes == 10 and dataset.in_shape == (32, 32, 3)
    fresh = load_dataset("synthetic", cache_dir=tmp_path / "other", progress=False)
    assert fresh.from_cache is False and fresh.fingerprint == dataset.fingerprint


def test_synthetic_is_learnable_from_class_structure(tmp_path):
    dataset = _load("synthetic:1000,300", tmp_path)
    train = dataset.train_images.reshape(1000, -1).astype(np.float32)
    test = dataset.test_images.reshape(300, -1).astype(np.float32)
    centroids = np.stack([train[dataset.train_labels == c].mean(0) for c in range(10)])
    predicted = np.argmin(((test[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (predicted == dataset.test_labels).mean() > 0.6  # even nearest-centroid; a CNN gets ~100%


@pytest.mark.parametrize("spec", ["synthetic:10", "synthetic:a,b", "synthetic:0,5", "synthetic:5,-1"])
def test_bad_synthetic_sizes(tmp_path, spec):
    with pytest.raises(DataError, match="synthetic:N_TRAIN,N_TEST"):
        _load(spec, tmp_path)


@pytest.mark.parametrize("spec", ["imagenet", "cifar100:/x", "folder:", "tfds:", ""])
def test_unknown_spec_lists_valid_forms(tmp_path, spec):
    with pytest.raises(DataError) as err:
        _load(spec, tmp_path)
    assert isinstance(err.value, UserError)
    for pattern, _ in DATASET_SPECS:
        assert pattern in str(err.value)


# --- import purity ------------------------------------------------------------------------------

def test_common_data_imports_no_framework_or_pil():
    code = ("import sys, common, common.data, common.data.cache, common.data.cifar, common.data.folder, "
            "common.data.synthetic, common.data.tfds\n"
            "bad = [m for m in ('torch', 'tensorflow', 'keras', 'torchvision', 'tensorflow_datasets', 'PIL', "
            "'tqdm') if m in sys.modules]\nassert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=fx.PROJECT_ROOT)


def test_no_framework_import_statements_in_common():
    pattern = re.compile(r"^\s*(import|from)\s+(torch|tensorflow|keras|torchvision|tensorflow_datasets)\b", re.M)
    for path in (fx.PROJECT_ROOT / "common").rglob("*.py"):
        assert not pattern.search(path.read_text()), path
