"""`dualbench export` with the real frameworks: every format of resnet20 and mobilenet_v2 made, loaded by
its own runtime in a fresh process and verified; cross-framework ONNX; serving; wrong artifacts; a failing
converter. Small inputs (8x8 images) keep it within CI time.
"""
from __future__ import annotations

import resource

import numpy as np
import pytest
import torch

from common.architectures import arch_spec
from common.config import RunSpec
from common.data import load_dataset
from common.deploy import FORMATS, format_of
from common.init import initial_weights
from common.results import RunResult, write_jsonl_atomic
from common.weights import save_weights
from compare.deployment import LATENCY_PLOT, load_deployment, write_outputs
from compare.export import ExportJob, Exporter, ExportSettings
from compare.export_plan import run_jobs
from compare.store import ResultsStore
from tests.data_fixtures import write_image_folder
from tests.runner_helpers import run_cli

pytestmark = pytest.mark.slow
MODELS = ("resnet20", "mobilenet_v2")
CLASSES = tuple(f"class{i}" for i in range(10))


def trained_like(model: str, in_shape, seed: int) -> dict[str, np.ndarray]:
    """Initial weights with BN statistics and affine parameters far from identity, as after training:
    an artifact that dropped or mixed up BN moving statistics would not match."""
    weights = initial_weights(arch_spec(model, len(CLASSES), in_shape), "torch_default", seed)
    rng = np.random.default_rng(seed)
    for name, value in weights.items():
        draw = {"moving_mean": lambda s: rng.normal(0, 0.3, s), "moving_variance": lambda s: rng.uniform(0.5, 2, s),
                "gamma": lambda s: rng.uniform(0.5, 1.5, s), "beta": lambda s: rng.normal(0, 0.2, s)}
        suffix = name.rsplit(".", 1)[1]
        if suffix in draw:
            weights[name] = draw[suffix](value.shape).astype(np.float32)
    return weights


@pytest.fixture(scope="module")
def results_folder(tmp_path_factory):
    """A results folder as `dualbench run` leaves it: ok runs of both models in both frameworks, their
    final weights, an 8x8 image-folder dataset. resnet20's torch and TensorFlow runs have different
    weights (the cross-framework check transfers torch's); mobilenet_v2's share them (no transfer)."""
    patch = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("export")
    patch.setenv("DUALBENCH_CACHE", str(root / "cache"))
    write_image_folder(root / "images", classes=CLASSES, per_class=(1, 4), size=(8, 8))
    spec_data = f"folder:{root / 'images'}"
    dataset = load_dataset(spec_data, progress=False)
    out = root / "results"
    rows = []
    for model in MODELS:
        for index, backend in enumerate(("torch", "tensorflow")):
            run_id = f"{model}__{backend}__seed0"
            weights = trained_like(model, dataset.in_shape, index if model == "resnet20" else 0)
            sha = save_weights(out / "weights" / f"{run_id}.npz", weights)
            rows.append(RunResult(run_id=run_id, model=model, backend=backend, seed=0, test_accuracy=0.1,
                                  spec=RunSpec(model=model, backend=backend, data=spec_data).to_dict(),
                                  final_weights_file=f"weights/{run_id}.npz", final_weights_sha256=sha,
                                  manifest={"data_fingerprint": dataset.fingerprint}).to_dict())
    write_jsonl_atomic(out / "runs.jsonl", rows)
    code = run_cli("export", str(out), "--serve", "none", "--jobs", "2", "--threads", "1")
    yield out, code, load_deployment(out / "export")
    patch.undo()


def test_every_format_of_both_models_is_made_and_verified(results_folder):
    out, code, deployment = results_folder
    assert code == 0
    rows = deployment["rows"]
    assert sorted((r["model"], r["backend"], r["format"]) for r in rows) == sorted(
        (m, f.backend, f.name) for m in MODELS for f in FORMATS)
    for row in rows:
        where = f"{row['label']} {row['format']}"
        assert row["status"] == "ok", (where, row["error"])
        assert (out / "export" / row["artifact"]).exists(), where
        assert row["images"] == 40 and row["top1_agreement"] == 1.0, where
        assert row["max_rel_diff"] <= format_of(row["backend"], row["format"]).rtol, where
        assert row["size_bytes"] > 0 and row["exporter"], where
        # ONNX and LiteRT files run in a process that loaded no framework at all
        runtime_only = row["runtime"] in ("onnxruntime", "litert")
        assert (row["verify_frameworks"] == []) == runtime_only, (where, row["verify_frameworks"])
    torch_onnx = [r for r in rows if r["backend"] == "torch" and r["format"] == "onnx"]
    assert all("dynamo=True" in r["exporter"] and r["fallback_reason"] is None for r in torch_onnx)


def test_torch_and_tensorflow_onnx_agree_from_the_same_weights(results_folder):
    out, _code, deployment = results_folder
    cross = {c["model"]: c for c in deployment["cross_framework"]}
    assert set(cross) == set(MODELS)
    for model, check in cross.items():
        assert check["passed"] and check["max_rel_diff"] <= 1e-4 and check["top1_agreement"] == 1.0, check
        assert check["weights_from"] == f"{model}__torch__seed0"
        assert (out / "export" / check["tensorflow_onnx"]).exists()
    # resnet20's TensorFlow run had other weights: its ONNX was re-made from torch's (a parity transfer);
    # mobilenet_v2's runs share their weights, so TensorFlow's own ONNX is the one compared
    assert cross["resnet20"]["tensorflow_onnx"].startswith("resnet20__seed0__tensorflow_from_resnet20__torch")
    assert cross["mobilenet_v2"]["tensorflow_onnx"] == "mobilenet_v2__tensorflow__seed0/model.onnx"


def test_outputs_and_the_report_section(results_folder):
    out, _code, _deployment = results_folder
    for name in ("deployment.json", "deployment.csv", "cross_framework.csv"):
        assert (out / "export" / name).exists(), name
    report = (out / "report.md").read_text()
    assert "## Deployment" in report and "### Verification" in report
    assert not list((out / "export").glob(".work-*"))


def test_serving_every_runtime_in_its_own_process(results_folder):
    out, _code, deployment = results_folder
    exporter = Exporter(out / "export", ExportSettings(threads=1, seconds=0.05, rounds=1, warmup=2))
    try:
        jobs = [job for job in run_jobs(ResultsStore(out), exporter) if job.model == "resnet20"]
        rows = [{**r, "serve": True} for r in deployment["rows"] if r["model"] == "resnet20"]
        exporter.serve(jobs, rows)
    finally:
        exporter.close()
    assert len(rows) == 6 and exporter.launches == 6  # one process per artifact and round
    parent_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for row in rows:
        where = row["format"]
        assert 0 < row["latency_p50_ms"] <= row["latency_p90_ms"] <= row["latency_p99_ms"], where
        assert row["batch64_img_s"] > 0 and row["load_s"] >= 0 and row["batch1_calls"] >= 20, where
        threads = row["serve_threads"]
        assert threads.get("intra_op_threads", threads.get("num_threads")) == 1, (where, threads)
        if row["runtime"] in ("onnxruntime", "litert"):
            assert row["serve_frameworks"] == [], where
            # the serving process's own peak, not this (framework-laden) parent's RSS carried over exec
            assert row["peak_rss_bytes"] < parent_rss / 2, (where, row["peak_rss_bytes"], parent_rss)
    deployment["rows"] = rows
    assert any(p.name == LATENCY_PLOT for p in write_outputs(out / "served", deployment))


def _torch_job(tmp_path, in_shape=(8, 8, 3)) -> tuple[ExportJob, torch.nn.Module, np.ndarray]:
    from torch_impl.backend import Backend

    weights = trained_like("resnet20", in_shape, 0)
    images = np.random.default_rng(0).standard_normal((16, *in_shape)).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    save_weights(tmp_path / "w.npz", weights)
    backend = Backend()
    model = backend.build_model("resnet20", 10, in_shape)
    backend.set_weights(model, weights)
    reference = backend.predict(model, images)
    job = ExportJob(label="wrong", model="resnet20", backend="torch", seed=0, weights=tmp_path / "w.npz",
                    weights_sha256=None, images=tmp_path / "images.npy", num_classes=10, in_shape=in_shape)
    return job, model, reference


class _Transposed(torch.nn.Module):
    """The model reading its NCHW input with H and W swapped: a transposed layout."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x.transpose(2, 3))


@pytest.mark.parametrize("wrong,expected", [("bn_training", "BatchNorm exported in training mode"),
                                            ("transposed", "transposed layout")])
def test_a_wrong_artifact_fails_verification_saying_what_differs(tmp_path, wrong, expected):
    job, model, reference = _torch_job(tmp_path)
    exporter = Exporter(tmp_path / "export", ExportSettings(threads=1))
    try:
        row = exporter.row_for(job, format_of("torch", "torch_export"))
        artifact = exporter.root / row["artifact"]
        artifact.parent.mkdir(parents=True)
        module = model.train() if wrong == "bn_training" else _Transposed(model.eval())
        example = torch.zeros(2, 3, 8, 8)
        program = torch.export.export(module, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        torch.export.save(program, str(artifact))
        exporter.verify(job, row, reference)
    finally:
        exporter.close()
    assert row["status"] == "mismatch" and row["verified"] is False
    assert "torch_export differs from torch's own eval logits: max relative difference" in row["error"]
    assert expected in row["error"], row["error"]


def test_a_failing_converter_is_recorded_and_the_other_formats_continue(tmp_path, monkeypatch, capsys):
    stubs = tmp_path / "stubs"
    for name, message in (("tf2onnx", "tf2onnx is broken (test stub)"),
                          ("onnxscript", "onnxscript is broken (test stub)")):
        (stubs / name).mkdir(parents=True)
        (stubs / name / "__init__.py").write_text(f"raise ImportError({message!r})\n")
    monkeypatch.setenv("PYTHONPATH", f"{stubs}:{__import__('os').environ.get('PYTHONPATH', '')}")
    code = run_cli("export", "--models", "seed_cnn", "--out", str(tmp_path / "out"), "--in-shape", "8,8,3",
                   "--images", "8", "--formats", "onnx,keras", "--serve", "none", "--threads", "1", "--jobs", "2")
    deployment = load_deployment(tmp_path / "out")
    rows = {(r["backend"], r["format"]): r for r in deployment["rows"]}
    failed = rows[("tensorflow", "onnx")]
    assert failed["status"] == "failed" and "tf2onnx" in failed["error"] and "\n" not in failed["error"]
    assert rows[("tensorflow", "keras")]["status"] == "ok"  # the other formats went on
    fallback = rows[("torch", "onnx")]  # torch.export-based exporter unavailable: TorchScript, with the reason
    assert fallback["status"] == "ok" and "TorchScript fallback" in fallback["exporter"]
    assert "onnxscript is broken" in fallback["fallback_reason"]
    assert deployment["cross_framework"][0]["passed"] is False  # nothing to compare torch's ONNX with
    assert code == 1
    assert "failed: seed_cnn__tensorflow onnx" in capsys.readouterr().err
