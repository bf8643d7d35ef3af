"""Fashion-MNIST / MNIST SPECs on generated idx files: formats, the checks applied, every failure named.

The real files are not on CI; the datasets' expected counts are shrunk to the generated ones with
monkeypatch (as the CIFAR tests shrink the official checksum table).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from common.data import idx as data_idx
from common.data import load_dataset
from common.errors import DataError
from tests import data_fixtures as fx


@pytest.fixture
def small(monkeypatch, tmp_path):
    """Both idx datasets expect 20 train / 6 test images and are installed nowhere on this machine."""
    for name, dataset in list(data_idx.IDX_DATASETS.items()):
        monkeypatch.setitem(data_idx.IDX_DATASETS, name, dataclasses.replace(
            dataset, counts=(20, 6), system_dirs=(str(tmp_path / "system" / name),)))
    return data_idx.IDX_DATASETS


def _load(spec, tmp_path, **kwargs):
    return load_dataset(spec, cache_dir=tmp_path / "cache", progress=False, **kwargs)


def _assert_arrays(dataset, arrays):
    for name in ("train_images", "test_images"):
        np.testing.assert_array_equal(dataset.__getattribute__(name), arrays[name][..., None])
    for name in ("train_labels", "test_labels"):
        np.testing.assert_array_equal(dataset.__getattribute__(name), arrays[name].astype(np.int64))


@pytest.mark.parametrize("prefix", ["fashion_mnist", "mnist"])
@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
def test_idx_files_decode_to_one_channel_nhwc_with_the_class_names(small, tmp_path, prefix, compress):
    arrays = fx.idx_arrays()
    fx.write_idx_files(tmp_path / "src", arrays, compress=compress)
    dataset = _load(f"{prefix}:{tmp_path / 'src'}", tmp_path)
    _assert_arrays(dataset, arrays)
    assert dataset.in_shape == (28, 28, 1) and dataset.train_images.dtype == np.uint8
    assert dataset.class_names == small[prefix].class_names
    assert dataset.verification.startswith("content: idx magic numbers, 20/6 images of 28x28, labels 0..9")
    reason = "not upstream's .gz bytes" if compress else "uncompressed"
    assert reason in dataset.verification and "all four files" in dataset.verification


def test_gz_raw_and_recompressed_copies_are_the_same_dataset(small, tmp_path):
    arrays = fx.idx_arrays(seed=4)
    fx.write_idx_files(tmp_path / "gz", arrays)
    fx.write_idx_files(tmp_path / "raw", arrays, compress=False)
    fx.write_idx_files(tmp_path / "regz", arrays, gzip_level=1)  # a distribution's re-compression
    prints = {_load(f"fashion_mnist:{tmp_path / where}", tmp_path).fingerprint for where in ("gz", "raw", "regz")}
    assert len(prints) == 1


def test_upstream_md5_is_checked_where_the_gz_files_are_upstreams(small, monkeypatch, tmp_path):
    written = fx.write_idx_files(tmp_path / "src", fx.idx_arrays())
    published = {path.name: fx.md5(path) for path in written.values()}
    monkeypatch.setitem(small, "fashion_mnist", dataclasses.replace(small["fashion_mnist"], upstream_md5=published))
    dataset = _load(f"fashion_mnist:{tmp_path / 'src'}", tmp_path)
    assert dataset.verification.startswith("upstream MD5 of the four .gz files; content:")
    # the same content re-compressed: not upstream's .gz bytes any more, the content check still passes
    fx.write_idx_files(tmp_path / "regz", fx.idx_arrays(), gzip_level=1)
    again = _load(f"fashion_mnist:{tmp_path / 'regz'}", tmp_path)
    assert again.verification.startswith("content:") and "re-compressed" in again.verification
    assert again.fingerprint == dataset.fingerprint


def test_the_check_applied_is_kept_with_the_cache_entry(small, tmp_path):
    fx.write_idx_files(tmp_path / "src", fx.idx_arrays())
    first = _load(f"mnist:{tmp_path / 'src'}", tmp_path)
    second = _load(f"mnist:{tmp_path / 'src'}", tmp_path)
    assert not first.from_cache and second.from_cache
    assert second.verification == first.verification != ""


def test_torchvision_raw_layout_is_found(small, tmp_path):
    arrays = fx.idx_arrays()
    fx.write_idx_files(tmp_path / "root" / "FashionMNIST" / "raw", arrays)
    _assert_arrays(_load(f"fashion_mnist:{tmp_path / 'root'}", tmp_path), arrays)


def test_no_path_form_reads_the_system_install_then_the_cache(small, tmp_path):
    arrays = fx.idx_arrays(seed=2)
    system = tmp_path / "system" / "fashion_mnist"
    fx.write_idx_files(system, arrays)
    first = _load("fashion_mnist", tmp_path)
    _assert_arrays(first, arrays)
    for path in system.iterdir():  # gone from the system: the cache still serves it
        path.unlink()
    second = _load("fashion_mnist", tmp_path)
    assert second.from_cache and second.fingerprint == first.fingerprint


def test_no_path_form_without_cache_or_install_names_how_to_get_it(small, tmp_path):
    with pytest.raises(DataError) as err:
        _load("fashion_mnist", tmp_path)
    assert "apt-get install dataset-fashion-mnist" in str(err.value) and "fashion_mnist:PATH" in str(err.value)
    with pytest.raises(DataError, match="--data mnist:PATH"):
        _load("mnist", tmp_path)


def test_missing_file_is_named(small, tmp_path):
    written = fx.write_idx_files(tmp_path / "src", fx.idx_arrays())
    written["test_labels"].unlink()
    with pytest.raises(DataError, match=r"lacks the Fashion-MNIST file\(s\) t10k-labels-idx1-ubyte\[\.gz\]"):
        _load(f"fashion_mnist:{tmp_path / 'src'}", tmp_path)


def _damaged(tmp_path, damage) -> str:
    arrays = fx.idx_arrays()
    damage(arrays)
    fx.write_idx_files(tmp_path / "src", arrays)
    return f"fashion_mnist:{tmp_path / 'src'}"


@pytest.mark.parametrize("damage, message", [
    (lambda a: a.update(train_images=a["train_images"][:19]), r"shape \(19, 28, 28\).*not the Fashion-MNIST file"),
    (lambda a: a.update(test_images=a["test_images"][:, :27]), r"shape \(6, 27, 28\)"),
    (lambda a: a.update(test_labels=a["test_labels"][:5]), r"holds \(5,\) labels"),
    (lambda a: a["train_labels"].__setitem__(3, 10), "has label 10"),
], ids=["train_count", "image_shape", "label_count", "label_range"])
def test_content_that_is_not_the_dataset_is_refused(small, tmp_path, damage, message):
    with pytest.raises(DataError, match=message):
        _load(_damaged(tmp_path, damage), tmp_path)


def test_bad_magic_truncation_and_broken_gzip_are_refused(small, tmp_path):
    written = fx.write_idx_files(tmp_path / "src", fx.idx_arrays(), compress=False)
    spec = f"fashion_mnist:{tmp_path / 'src'}"
    good = written["train_labels"].read_bytes()
    written["train_labels"].write_bytes(b"\x00\x00\x0d\x01" + good[4:])  # type 0x0d (float), not uint8
    with pytest.raises(DataError, match="magic number 00000d01"):
        _load(spec, tmp_path)
    written["train_labels"].write_bytes(good[:-3])
    with pytest.raises(DataError, match="truncated or damaged"):
        _load(spec, tmp_path)
    written["train_labels"].unlink()
    gz = fx.write_idx_files(tmp_path / "gz", fx.idx_arrays())["train_images"]
    fx.flip_byte(gz, offset=len(gz.read_bytes()) - 6)  # inside the CRC32 trailer
    with pytest.raises(DataError, match="damaged gzip file"):
        _load(f"fashion_mnist:{tmp_path / 'gz'}", tmp_path)
