"""`dualbench bench` on the fake backend: the sweep, the out-of-memory boundary, output formats, bad input."""
import json

import pytest

from tests.runner_helpers import fake_env, run_cli  # noqa: F401
from tests.fake_backend import FAULT_ENV


def test_bench_json_rows_and_oom_boundary(fake_env, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(FAULT_ENV, "*:oombatch@64")
    csv = tmp_path / "bench.csv"
    code = run_cli("bench", "--models", "seed_cnn", "--backends", "fakea", "--batch-size", "16,32,64,128",
                   "--steps", "3", "--measure-warmup-steps", "1", "--data", "synthetic:256,128", "--json",
                   "--out", str(csv))
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    ok = [r for r in rows if r["status"] == "ok"]
    assert {(r["phase"], r["measure"]) for r in ok} == {("train", "compute"), ("train", "pipeline"),
                                                        ("infer", "compute"), ("infer", "pipeline")}
    for r in ok:
        assert r["model"] == "seed_cnn" and r["backend"] == "fakea" and r["images_per_sec"] > 0
        assert r["host_peak_rss_bytes"] > 10 * 2**20 and r["device_peak_bytes"] is None
    # 64 does not fit: recorded as oom, retried at 48 (halfway from 32), 128 never tried
    sizes = [(r["batch_size"], r["status"], r["retry_of"]) for r in rows]
    assert (64, "oom", None) in sizes and (48, "ok", 64) in sizes
    assert all(b != 128 for b, _, _ in sizes)
    assert csv.read_text().splitlines()[0].startswith("model,backend,mode,style,precision,batch_size,phase")


def test_bench_bad_input_is_one_line_and_exit_2(fake_env, capsys):
    assert run_cli("bench", "--models", "seed_cnn", "--backends", "fakea", "--batch-size", "0") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--batch-size" in err[0]
    assert run_cli("bench", "--models", "nope", "--backends", "fakea") == 2
    assert run_cli("bench", "--models", "seed_cnn", "--backends", "fakea", "--data", "folder:/nonexistent") == 2
    assert "Traceback" not in capsys.readouterr().err


def _bench_args(*argv: str):
    import argparse

    from compare import cmd_bench

    parser = argparse.ArgumentParser()
    cmd_bench.register(parser)
    return cmd_bench, parser.parse_args(["--models", "seed_cnn", "--backends", "fakea", *argv])


def test_bench_default_data_keeps_the_timed_pipeline_steps_inside_one_epoch(fake_env, capsys):
    # 512 * (20 + 5) = 12800 images drawn: the default synthetic set is sized to hold them
    cmd_bench, args = _bench_args("--batch-size", "32,512", "--steps", "20", "--measure-warmup-steps", "5")
    configs, _ = cmd_bench.build_configs(args)
    assert configs[0].base.data == "synthetic:13000,1000"  # and a full eval batch of 512
    assert "epoch restarts" not in capsys.readouterr().err
    # a dataset the user names is kept; one too small for the timed window gets a note saying so
    cmd_bench, args = _bench_args("--batch-size", "128", "--steps", "3", "--measure-warmup-steps", "1",
                                  "--data", "synthetic:256,128")
    configs, _ = cmd_bench.build_configs(args)
    assert configs[0].base.data == "synthetic:256,128"
    err = capsys.readouterr().err
    assert "256 training images" in err and "512" in err and "epoch restarts" in err


def test_pipeline_measure_counts_the_images_it_saw_and_its_p50_is_a_median(monkeypatch):
    import numpy as np

    import common.bench as bench
    from tests.fake_clock import FakeClock

    clock = FakeClock()
    clock.install(monkeypatch, bench)
    durations = iter([1.0, 2.0, 4.0, 64.0])  # warm-up, then three timed steps: 2, 4, 64

    def step(x, y):
        clock.launch(next(durations))  # device work: counted only because the measure synchronizes

    batches = [(np.zeros((n, 4)), np.zeros(n)) for n in (8, 8, 8, 3)]
    row = bench._pipeline_timed(clock, step, iter(batches), steps=3, warmup=1, batch=8)
    assert clock.unsynced_reads == []
    assert row["step_time_p50_s"] == 4.0  # the median; the mean would be 70 / 3
    assert row["images_per_sec"] == pytest.approx((8 + 8 + 3) / 70.0)  # the short batch counts as short


def test_eval_stream_hands_out_full_batches_pass_after_pass():
    import numpy as np

    from common.bench import eval_stream

    class Eval:
        def __init__(self, sizes):
            self.sizes, self.passes = sizes, 0

        def eval_batches(self):
            self.passes += 1
            for n in self.sizes:
                yield np.zeros((n, 4)), np.zeros(n)

    backend = Eval([8, 8, 3])
    stream = eval_stream(backend, 8)
    assert [len(next(stream)[1]) for _ in range(5)] == [8, 8, 8, 8, 8] and backend.passes == 3
    small = eval_stream(Eval([3]), 8)  # a test set smaller than the batch: what there is
    assert [len(next(small)[1]) for _ in range(2)] == [3, 3]


def test_infer_pipeline_measure_times_producing_its_batches(fake_env, monkeypatch):
    """The eval batches are produced inside the infer/pipeline window, not listed before the clock."""
    import common.bench as bench
    from common.bench import bench_spec, measure
    from tests.fake_backend import FakeBackend
    from tests.fake_clock import FakeClock

    produce, infer = 2.0, 8.0  # seconds per eval batch / per eval call
    clock = FakeClock()
    clock.install(monkeypatch, bench)

    class Costed(FakeBackend):
        def eval_batches(self, raw=False):
            for batch in super().eval_batches(raw):
                clock.host(produce)
                yield batch

        def make_eval_step(self, model):
            def step(images):
                clock.host(infer)
                return model.logits(images)
            return step

    spec = bench_spec("seed_cnn", "fakea", 32, "synthetic:256,96", warmup_steps=1)
    rows = {(r["phase"], r["measure"]): r for r in measure(Costed(), spec, steps=4, phases=("infer",))}
    assert rows[("infer", "compute")]["step_time_p50_s"] == infer
    piped = rows[("infer", "pipeline")]
    assert piped["step_time_p50_s"] == produce + infer  # today's code: the list() was built before t0
    assert piped["images_per_sec"] == pytest.approx(32 / (produce + infer))


def test_bench_records_and_prints_a_backend_fallback(fake_env, monkeypatch, capsys):
    monkeypatch.setenv(FAULT_ENV, "fakea:fallback")
    assert run_cli("bench", "--models", "seed_cnn", "--backends", "fakea,fakeb", "--batch-size", "16",
                   "--steps", "2", "--measure-warmup-steps", "0", "--phases", "train",
                   "--data", "synthetic:256,128") == 0
    out = capsys.readouterr().out
    assert "note: could not apply everything as asked: seed_cnn / fakea: fake backend: simulated fallback" in out
    assert "fakeb:" not in out
