"""`dualbench data prepare`, `dualbench list`, the offline `cifar10` error and the tfds path.

tensorflow is only ever imported in subprocesses: this pytest process has
torch loaded (tests/conftest.py), and the two must not share a process.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np

from common.data import tfds as data_tfds
from common.data import load_dataset
from tests import data_fixtures as fx


def test_data_prepare_on_a_folder_then_from_cache(tmp_path):
    fx.write_image_folder(tmp_path / "imgs", classes=("cat", "ant", "bee"), per_class=(3, 2))
    args = ["data", "prepare", "--data", f"folder:{tmp_path / 'imgs'}", "--no-progress"]
    first = fx.run_cli(args, tmp_path / "cache")
    assert first.returncode == 0, first.stderr
    out = first.stdout
    assert "decoded from the source and cached" in out
    assert "classes      3: ant, bee, cat" in out
    assert "image shape  6 x 8 x 3" in out
    assert "train        9 images" in out and "test         6 images" in out
    assert any(line.split() == ["bee", "3", "2"] for line in out.splitlines())
    fingerprint = next(line.split("sha256:")[1] for line in out.splitlines() if line.startswith("fingerprint"))
    assert len(fingerprint) == 64
    second = fx.run_cli(args, tmp_path / "cache")
    assert second.returncode == 0 and "served from cache" in second.stdout
    assert f"sha256:{fingerprint}" in second.stdout


def test_data_prepare_with_subsets(tmp_path):
    args = ["data", "prepare", "--data", "synthetic:100,40", "--train-subset", "20", "--test-subset", "10",
            "--seed", "1", "--no-progress"]
    result = fx.run_cli(args, tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    assert "train        20 images" in result.stdout and "stratified, seed 1" in result.stdout


def test_data_prepare_user_errors_are_one_line(tmp_path):
    result = fx.run_cli(["data", "prepare", "--data", f"folder:{tmp_path / 'missing'}"], tmp_path / "cache")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "--data folder:PATH" in result.stderr
    bad = fx.run_cli(["data", "prepare", "--data", "synthetic", "--train-subset", "0"], tmp_path / "cache")
    assert bad.returncode == 2 and "positive integer" in bad.stderr


def test_cifar10_offline_is_one_clear_line(tmp_path):
    result = fx.run_cli(["data", "prepare", "--data", "cifar10"], tmp_path / "cache", prelude=fx.NO_NETWORK)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--data cifar10:PATH" in lines[0] and "--data folder:PATH" in lines[0]
    assert not list((tmp_path / "cache").rglob("*.part*"))  # nothing half-written left behind


def test_list_prints_specs_models_and_backends(tmp_path):
    result = fx.run_cli(["list"], tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    for text in ("cifar10:PATH", "folder:PATH", "tfds:NAME", "synthetic", "resnet20", "torch", "tensorflow"):
        assert text in result.stdout


_EXPORT_UNDER_MOCK = textwrap.dedent("""
    import contextlib, io, sys
    import numpy as np
    import tensorflow_datasets as tfds
    from tf_impl import worker
    with tfds.testing.mock_data(num_examples=12):
        tx, ty, vx, vy, names = worker._export_arrays("cifar10")
    assert tx.dtype == np.uint8 and tx.shape == (12, 32, 32, 3), (tx.dtype, tx.shape)
    assert vx.dtype == np.uint8 and vx.shape == (12, 32, 32, 3), (vx.dtype, vx.shape)
    assert ty.dtype == np.int64 and vy.dtype == np.int64 and ty.shape == (12,)
    assert 0 <= ty.min() and max(ty.max(), vy.max()) < 10 and len(names) == 10
    builder_names = tfds.builder("cifar10").info.features["label"].names
    assert list(names) == list(builder_names), (names, builder_names)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = worker.main("tensorflow", ["tfds-export", "no_such_dataset_xyz", sys.argv[1]], worker._TASKS)
    lines = err.getvalue().strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(worker._ERROR_PREFIX), err.getvalue()
    print("ok")
""")


def test_tfds_export_arrays_under_mock_data(tmp_path):
    result = subprocess.run([sys.executable, "-c", _EXPORT_UNDER_MOCK, str(tmp_path / "out")],
                            cwd=fx.PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


_MAIN_UNDER_MOCK = textwrap.dedent("""
    import sys
    import tensorflow_datasets as tfds
    from tf_impl import worker
    with tfds.testing.mock_data(num_examples=15):
        sys.exit(worker.main("tensorflow", ["tfds-export", *sys.argv[1:]], worker._TASKS))
""")


def test_tfds_spec_via_subprocess_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))  # nothing prepared there
    monkeypatch.setattr(data_tfds, "export_command",
                        lambda name, out_dir: [sys.executable, "-c", _MAIN_UNDER_MOCK, name, str(out_dir)])
    had_tensorflow = "tensorflow" in sys.modules  # other tests may have imported it in this process
    dataset = load_dataset("tfds:cifar10", cache_dir=tmp_path / "cache", progress=False)
    assert dataset.train_images.shape == (15, 32, 32, 3) and dataset.train_labels.dtype == np.int64
    assert dataset.num_classes == 10 and not dataset.from_cache
    assert ("tensorflow" in sys.modules) == had_tensorflow  # the export ran in a child process
    again = load_dataset("tfds:cifar10", cache_dir=tmp_path / "cache", progress=False)
    assert again.from_cache and again.fingerprint == dataset.fingerprint
