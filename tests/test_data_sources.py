"""Decoders of common.data: official CIFAR-10 formats and image folders, on tiny generated files."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from common.data import cifar as data_cifar, folder as data_folder
from common.data import load_dataset
from common.errors import DataError
from tests import data_fixtures as fx


def _load(spec: str, tmp_path, **kwargs):
    return load_dataset(spec, cache_dir=tmp_path / "cache", progress=False, **kwargs)


def _assert_matches(dataset, arrays, class_names=fx.CLASSES):
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(dataset, name), arrays[name], err_msg=name)
    assert dataset.train_images.dtype == np.uint8 and dataset.train_labels.dtype == np.int64
    assert dataset.class_names == tuple(class_names)


# --- official CIFAR-10 formats -------------------------------------------------------------

@pytest.mark.parametrize("version", ["python", "binary"])
@pytest.mark.parametrize("packaging", ["extracted", "archive", "parent_of_extracted", "parent_of_archive"])
def test_cifar_formats_decode_to_nhwc(tmp_path, version, packaging):
    arrays = fx.cifar_arrays()
    src = tmp_path / "src"
    write = fx.write_cifar_python if version == "python" else fx.write_cifar_binary
    extracted = write(src, arrays)
    archive_name = "cifar-10-python.tar.gz" if version == "python" else "cifar-10-binary.tar.gz"
    if packaging in ("archive", "parent_of_archive"):
        (tmp_path / "arc").mkdir()
        archive = fx.write_archive(extracted, tmp_path / "arc" / archive_name)
        path = archive if packaging == "archive" else archive.parent
    else:
        path = extracted if packaging == "extracted" else src
    dataset = _load(f"cifar10:{path}", tmp_path)
    _assert_matches(dataset, arrays)
    assert dataset.in_shape == (32, 32, 3) and dataset.num_classes == 10


def test_python_and_binary_versions_give_the_same_fingerprint(tmp_path):
    arrays = fx.cifar_arrays(seed=3)
    py = _load(f"cifar10:{fx.write_cifar_python(tmp_path / 'a', arrays)}", tmp_path)
    binary = _load(f"cifar10:{fx.write_cifar_binary(tmp_path / 'b', arrays)}", tmp_path)
    assert py.fingerprint == binary.fingerprint


def test_missing_batch_file_is_named(tmp_path):
    extracted = fx.write_cifar_python(tmp_path, fx.cifar_arrays())
    (extracted / "data_batch_3").unlink()
    with pytest.raises(DataError, match="missing data_batch_3"):
        _load(f"cifar10:{extracted}", tmp_path)


def test_archive_missing_member_is_named(tmp_path):
    extracted = fx.write_cifar_binary(tmp_path / "src", fx.cifar_arrays())
    (extracted / "test_batch.bin").unlink()
    archive = fx.write_archive(extracted, tmp_path / "cifar-10-binary.tar.gz")
    with pytest.raises(DataError, match="lacks test_batch.bin"):
        _load(f"cifar10:{archive}", tmp_path)


def test_missing_path_names_both_fixes(tmp_path):
    with pytest.raises(DataError) as err:
        _load(f"cifar10:{tmp_path / 'nowhere'}", tmp_path)
    assert "--data cifar10:PATH" in str(err.value) and "--data folder:PATH" in str(err.value)


def test_folder_without_cifar_files_is_explained(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no CIFAR-10 data in"):
        _load(f"cifar10:{tmp_path / 'empty'}", tmp_path)


def test_non_archive_file_is_explained(tmp_path):
    bogus = tmp_path / "cifar.tar.gz"
    bogus.write_bytes(b"this is not a tar archive" * 10)
    with pytest.raises(DataError, match="cannot read .* as a tar archive"):
        _load(f"cifar10:{bogus}", tmp_path)


def test_truncated_binary_batch_is_named(tmp_path):
    extracted = fx.write_cifar_binary(tmp_path, fx.cifar_arrays())
    path = extracted / "data_batch_2.bin"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match="data_batch_2.bin has .* bytes"):
        _load(f"cifar10:{extracted}", tmp_path)


def test_foreign_pickle_is_refused_without_running_it(tmp_path):
    extracted = fx.write_cifar_python(tmp_path, fx.cifar_arrays())
    # a pickle that would call os.system if it were unpickled naively
    (extracted / "data_batch_1").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(DataError, match="cannot read CIFAR-10 file data_batch_1 .*unexpected pickled object os.system"):
        _load(f"cifar10:{extracted}", tmp_path)


def test_checksum_verified_for_official_size_files(tmp_path, monkeypatch):
    extracted = fx.write_cifar_python(tmp_path, fx.cifar_arrays())
    batch = extracted / "data_batch_2"
    table = {"data_batch_2": (batch.stat().st_size, fx.md5(batch))}  # the fixture plays "official"
    monkeypatch.setattr(data_cifar, "OFFICIAL_CHECKSUMS", table)
    assert data_cifar.verify_if_official(batch) is True
    _load(f"cifar10:{extracted}", tmp_path)  # intact: loads
    fx.flip_byte(batch)
    with pytest.raises(DataError) as err:
        _load(f"cifar10:{extracted}", tmp_path)
    message = str(err.value)
    assert "checksum mismatch" in message and str(batch) in message and "\n" not in message


def test_checksum_of_renamed_official_archive(tmp_path, monkeypatch):
    extracted = fx.write_cifar_python(tmp_path / "src", fx.cifar_arrays())
    archive = fx.write_archive(extracted, tmp_path / "renamed.tgz")
    table = dict(data_cifar.OFFICIAL_CHECKSUMS)
    table[data_cifar.PYTHON_ARCHIVE] = (archive.stat().st_size, fx.md5(archive))
    monkeypatch.setattr(data_cifar, "OFFICIAL_CHECKSUMS", table)
    fx.flip_byte(archive, offset=archive.stat().st_size - 20)
    with pytest.raises(DataError, match="checksum mismatch for .*renamed.tgz"):
        _load(f"cifar10:{archive}", tmp_path)


def test_files_of_other_sizes_are_not_checksummed(tmp_path):
    extracted = fx.write_cifar_python(tmp_path, fx.cifar_arrays())
    assert data_cifar.verify_if_official(extracted / "data_batch_1") is False


# --- image folders ----------------------------------------------------------------------------

def test_png_folder_exact_pixels_and_sorted_labels(tmp_path):
    arrays = fx.write_image_folder(tmp_path / "imgs", classes=("zebra", "ant", "moth"))
    dataset = _load(f"folder:{tmp_path / 'imgs'}", tmp_path)
    _assert_matches(dataset, arrays, class_names=("ant", "moth", "zebra"))
    assert dataset.in_shape == (6, 8, 3)  # (H, W, C) from size=(8, 6)
    assert list(dataset.train_labels) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_jpeg_folder_matches_pil_decoding(tmp_path):
    from PIL import Image

    fx.write_image_folder(tmp_path / "imgs", fmt="JPEG", size=(16, 16))
    dataset = _load(f"folder:{tmp_path / 'imgs'}", tmp_path)
    files = sorted((tmp_path / "imgs" / "train").glob("*/*.jpg"))
    expected = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    np.testing.assert_array_equal(dataset.train_images, expected)  # lossy: compare to decoded pixels


def test_grayscale_and_rgba_are_converted_to_rgb(tmp_path):
    from PIL import Image

    fx.write_image_folder(tmp_path / "imgs", size=(8, 6))
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8)
    Image.fromarray(grey, mode="L").save(tmp_path / "imgs" / "train" / "ant" / "zz_grey.png")
    rgba = np.full((6, 8, 4), 77, dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "imgs" / "test" / "bee" / "zz_rgba.png")
    dataset = _load(f"folder:{tmp_path / 'imgs'}", tmp_path)
    converted = dataset.train_images[3]  # ant: 00, 01, 02, zz_grey
    np.testing.assert_array_equal(converted, np.repeat(grey[..., None], 3, axis=2))
    assert dataset.test_images.shape[1:] == (6, 8, 3)


def test_wrong_image_size_names_the_file(tmp_path):
    from PIL import Image

    fx.write_image_folder(tmp_path / "imgs", size=(8, 6))
    odd = tmp_path / "imgs" / "test" / "cat" / "odd.png"
    Image.fromarray(np.zeros((7, 8, 3), dtype=np.uint8)).save(odd)
    with pytest.raises(DataError, match=f"image {odd} is 8x7 but .* is 8x6"):
        _load(f"folder:{tmp_path / 'imgs'}", tmp_path)


def test_corrupt_image_names_the_file(tmp_path):
    fx.write_image_folder(tmp_path / "imgs")
    broken = tmp_path / "imgs" / "train" / "bee" / "01.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=f"cannot decode image {broken}"):
        _load(f"folder:{tmp_path / 'imgs'}", tmp_path)


def test_empty_class_folder_is_named(tmp_path):
    fx.write_image_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "train" / "dog").mkdir()
    (tmp_path / "imgs" / "test" / "dog").mkdir()
    with pytest.raises(DataError, match="class folder .*train/dog is empty"):
        _load(f"folder:{tmp_path / 'imgs'}", tmp_path)


def test_missing_test_folder_is_explained(tmp_path):
    fx.write_image_folder(tmp_path / "imgs")
    for path in sorted((tmp_path / "imgs" / "test").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    (tmp_path / "imgs" / "test").rmdir()
    with pytest.raises(DataError, match="has no test/ folder"):
        _load(f"folder:{tmp_path / 'imgs'}", tmp_path)


def test_missing_folder_is_explained(tmp_path):
    with pytest.raises(DataError, match="image folder .* not found: pass --data folder:PATH"):
        _load(f"folder:{tmp_path / 'nope'}", tmp_path)


def test_mismatched_class_sets_are_listed(tmp_path):
    fx.write_image_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "test" / "ant").rename(tmp_path / "imgs" / "test" / "wasp")
    with pytest.raises(DataError, match="only in train: ant; only in test: wasp"):
        _load(f"folder:{tmp_path / 'imgs'}", tmp_path)


def test_hidden_files_are_ignored(tmp_path):
    arrays = fx.write_image_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "train" / "ant" / ".DS_Store").write_bytes(b"junk")
    _assert_matches(_load(f"folder:{tmp_path / 'imgs'}", tmp_path), arrays, ("ant", "bee", "cat"))


_POOL_DECODE = """
import json, sys
import numpy as np
from common.data import folder as data_folder
from common.errors import DataError
data_folder.PARALLEL_MIN_FILES = 0
data_folder._available_cpus = lambda: 2
assert data_folder._fork_is_safe()
try:
    np.save(sys.argv[2], data_folder.decode_images(json.loads(open(sys.argv[1]).read())))
except DataError as exc:
    print(exc)
"""


def _pool_decode(paths, tmp_path):
    # In a fresh process: this pytest process has torch loaded, where the loader
    # (rightly) refuses to fork and decodes serially.
    (tmp_path / "paths.json").write_text(json.dumps(paths))
    result = subprocess.run([sys.executable, "-c", _POOL_DECODE, str(tmp_path / "paths.json"),
                             str(tmp_path / "out.npy")], cwd=fx.PROJECT_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_process_pool_decoding_equals_serial(tmp_path):
    fx.write_image_folder(tmp_path / "imgs", per_class=(40, 10))
    paths = sorted(str(p) for p in (tmp_path / "imgs").rglob("*.png"))
    assert _pool_decode(paths, tmp_path) == ""
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), data_folder.decode_images(paths))
    broken = paths[-3]
    with open(broken, "wb") as handle:
        handle.write(b"garbage")
    assert _pool_decode(paths, tmp_path).startswith(f"cannot decode image {broken}")


def test_no_fork_once_a_framework_is_loaded(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", sys.modules.get("torch") or object())
    assert data_folder._fork_is_safe() is False


# --- `cifar10` without a path: the downloaded archive in the cache -------------------------------

def _fake_official_archive(tmp_path, monkeypatch):
    """A tiny python-version archive that plays the official one, served from a file:// URL."""
    extracted = fx.write_cifar_python(tmp_path / "src", fx.cifar_arrays(seed=5))
    (tmp_path / "server").mkdir()
    archive = fx.write_archive(extracted, tmp_path / "server" / "cifar-10-python.tar.gz")
    table = dict(data_cifar.OFFICIAL_CHECKSUMS)
    table[data_cifar.PYTHON_ARCHIVE] = (archive.stat().st_size, fx.md5(archive))
    monkeypatch.setattr(data_cifar, "OFFICIAL_CHECKSUMS", table)
    monkeypatch.setattr(data_cifar, "OFFICIAL_URL", archive.as_uri())
    return archive


def test_cifar10_downloads_verifies_and_caches(tmp_path, monkeypatch):
    _fake_official_archive(tmp_path, monkeypatch)
    first = _load("cifar10", tmp_path)
    _assert_matches(first, fx.cifar_arrays(seed=5))
    downloads = tmp_path / "cache" / "downloads"
    assert [p.name for p in downloads.iterdir()] == ["cifar-10-python.tar.gz"]  # no .part left
    monkeypatch.setattr(data_cifar, "OFFICIAL_URL", "http://127.0.0.1:9/unreachable")
    second = _load("cifar10", tmp_path)  # served from the cache, no download attempted
    assert second.from_cache and second.fingerprint == first.fingerprint


def test_cifar10_download_with_wrong_checksum_leaves_nothing(tmp_path, monkeypatch):
    archive = _fake_official_archive(tmp_path, monkeypatch)
    table = dict(data_cifar.OFFICIAL_CHECKSUMS)
    table[data_cifar.PYTHON_ARCHIVE] = (archive.stat().st_size, "0" * 32)
    monkeypatch.setattr(data_cifar, "OFFICIAL_CHECKSUMS", table)
    with pytest.raises(DataError, match="has MD5 .* expected 0{32}"):
        _load("cifar10", tmp_path)
    assert list((tmp_path / "cache" / "downloads").iterdir()) == []


def test_cifar10_offline_error_in_process(tmp_path, monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    with pytest.raises(DataError) as err:
        _load("cifar10", tmp_path)
    message = str(err.value)
    assert "\n" not in message and "--data cifar10:PATH" in message and "--data folder:PATH" in message
