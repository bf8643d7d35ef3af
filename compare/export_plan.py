"""What `dualbench export` exports: the jobs of a results folder, or of fresh models.

* ``run_jobs``: every ok run of a results folder, with the final weights the
  run kept (OUT/weights/<run_id>.npz, SHA-256 recorded in its RunResult) and
  the test split of the run's own dataset SPEC and subset, normalised with the
  run's recipe (what the run evaluated on);
* ``fresh_jobs``: each model with its initial weights (common.init), the same
  weights for every backend, on a dataset's test split or on generated
  normalised images (quick checks, tests).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from common.architectures import arch_spec
from common.config import RunSpec
from common.errors import UserError
from common.init import initial_weights
from common.sampler import normalize_reference
from common.weights import save_weights
from compare.export import ExportJob, Exporter


def _test_images(spec: RunSpec, exporter: Exporter, expected_fingerprint: str | None,
                 key: str) -> tuple[Path, object]:
    """(verification images path, dataset) for a run: its test split, normalised as its pipelines did."""
    from common.data import load_dataset

    dataset = load_dataset(spec.data, train_subset=spec.train_subset, test_subset=spec.test_subset,
                           subset_seed=spec.seed, progress=False)
    if expected_fingerprint and dataset.fingerprint != expected_fingerprint:
        print(f"warning: {spec.data} now has fingerprint {dataset.fingerprint[:12]}..., the run recorded "
              f"{expected_fingerprint[:12]}...: verifying on the dataset as it is now", file=sys.stderr)
    recipe = spec.recipe
    images = normalize_reference(dataset.test_images, recipe.mean, recipe.std)
    return exporter.images_path(key, images), dataset


def run_jobs(store, exporter: Exporter) -> list[ExportJob]:
    """One job per ok run of ``store`` (a compare.store.ResultsStore); UserError when none can be exported."""
    if not store.runs_path.exists():
        raise UserError(f"{store.runs_path} not found: pass the --out folder of a `dualbench run`, "
                        "or export fresh models with --models NAME --out DIR")
    ok = [r for r in store.load_runs() if r.status == "ok"]
    if not ok:
        raise UserError(f"no run in {store.runs_path} finished ok: nothing to export")
    kept = {r.run_id for r in ok if r.final_weights_file and (store.root / r.final_weights_file).is_file()}
    if not kept:
        raise UserError(f"no ok run in {store.root} kept its final weights (weights/<run_id>.npz; runs made "
                        f"before dualbench kept them, or the folder was removed): rerun them with `dualbench run "
                        f"... --out {store.root} --force`, or export fresh models with --models")
    jobs, images = [], {}
    for result in ok:
        spec = RunSpec.from_dict(result.spec)
        cache_key = (spec.data, spec.train_subset, spec.test_subset, spec.seed, spec.recipe.mean, spec.recipe.std)
        if cache_key not in images:
            images[cache_key] = _test_images(spec, exporter, (result.manifest or {}).get("data_fingerprint"),
                                             key=f"run{len(images)}")
        path, dataset = images[cache_key]
        weights = store.root / (result.final_weights_file or f"weights/{result.run_id}.npz")
        missing = None if result.run_id in kept else (f"no final weights for {result.run_id} ({weights} is missing): "
                                               "rerun it with `dualbench run ... --force`")
        jobs.append(ExportJob(label=result.run_id, model=result.model, backend=result.backend, seed=result.seed,
                              weights=weights, weights_sha256=result.final_weights_sha256, images=path,
                              num_classes=dataset.num_classes, in_shape=dataset.in_shape,
                              bn_momentum=spec.recipe.bn_momentum, bn_epsilon=spec.recipe.bn_epsilon,
                              missing=missing))
    return jobs


def serving_subset(jobs: list[ExportJob], which: str) -> None:
    """Mark which jobs are served: "all", "none", or "first" (the lowest seed of each model and backend)."""
    firsts: dict[tuple[str, str], int] = {}
    for job in jobs:
        if not job.missing:
            key = (job.model, job.backend)
            firsts[key] = min(firsts.get(key, job.seed), job.seed)
    for job in jobs:
        job.serve = which == "all" or (which == "first" and firsts.get((job.model, job.backend)) == job.seed)


def fresh_jobs(models: list[str], backends: list[str], exporter: Exporter, *, seed: int, init_scheme: str,
               data: str | None, test_subset: int | None, in_shape: tuple[int, int, int],
               image_count: int) -> list[ExportJob]:
    """Jobs for new models: initial weights (one file per model, shared by every backend)."""
    if data:
        from common.config import CIFAR_MEAN, CIFAR_STD
        from common.data import load_dataset

        dataset = load_dataset(data, test_subset=test_subset, subset_seed=seed, progress=False)
        images = normalize_reference(dataset.test_images, CIFAR_MEAN, CIFAR_STD)
        num_classes, in_shape = dataset.num_classes, dataset.in_shape
    else:  # generated, already-normalised images (standard normal), like `dualbench parity`
        images = np.random.default_rng([seed, 15]).standard_normal((image_count, *in_shape)).astype(np.float32)
        num_classes = 10
    images_path = exporter.images_path(f"fresh-{seed}", images)
    jobs = []
    for model in models:
        weights_path = exporter.root / "weights" / f"{model}__seed{seed}.npz"
        sha = save_weights(weights_path, initial_weights(arch_spec(model, num_classes, in_shape), init_scheme, seed))
        jobs += [ExportJob(label=f"{model}__{backend}", model=model, backend=backend, seed=seed, weights=weights_path,
                           weights_sha256=sha, images=images_path, num_classes=num_classes, in_shape=in_shape)
                 for backend in backends]
    return jobs
