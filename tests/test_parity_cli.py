"""`dualbench parity`: each framework in its own subprocess; the exit code is the verdict."""
import pytest

from tests import data_fixtures as fx


@pytest.mark.slow
def test_parity_cli_passes_and_fails_on_the_relative_criterion(tmp_path):
    ok = fx.run_cli(["parity", "--models", "seed_cnn,resnet20", "--in-shape", "16,16,3", "--batch", "4"],
                    tmp_path / "cache", timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "PARITY PASSED for all models" in ok.stdout and "max_rel_diff" in ok.stdout
    # (two backends suffice to fail: the default run above compares all three)
    strict = fx.run_cli(["parity", "--models", "resnet20", "--in-shape", "16,16,3", "--batch", "4", "--rtol", "1e-12",
                         "--backends", "torch,tensorflow"], tmp_path / "cache", timeout=600)
    assert strict.returncode == 1 and "PARITY FAILED for resnet20" in strict.stdout, strict.stdout[-2000:]
