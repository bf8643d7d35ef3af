"""Image retrieval by embedding: cosine similarity, recall@k and mAP@R by class label (numpy only).

Queries (the test split) are ranked against a gallery (the training split) by the
cosine similarity of their embeddings (``Backend.embed``: penultimate-layer
features). A gallery item is relevant to a query when it has the query's class.

* recall@k: the fraction of queries with at least one relevant item among their k
  nearest gallery items (the metric-learning convention of Musgrave et al., "A
  Metric Learning Reality Check", 2020, and of the CUB/SOP retrieval benchmarks).
* mAP@R (same paper): for a query whose class has R items in the gallery,
  AP@R = (1/R) * sum over ranks i <= R of P@i * rel(i), where P@i is the
  precision of the first i results; mAP@R is its mean over queries. Unlike
  recall@k it rewards ranking *all* of the class first, not one lucky neighbour.

Ties in similarity are broken by gallery index (a stable sort), so the metrics
are a pure function of the embeddings. Similarities are computed for a chunk of
queries at a time (``chunk_for``), so a 50,000-image gallery of 1280-wide
embeddings never needs a queries x gallery matrix in memory.

``run_retrieval_request`` is the worker task behind ``dualbench retrieval``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

KS = (1, 5, 10)  # recall@k reported
SIMILARITY_BYTES = 64 << 20  # memory for one chunk of the queries x gallery similarity matrix (float32)


def l2_normalized(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); an all-zero row stays zero (similarity 0 to everything)."""
    x = np.asarray(x, np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def chunk_for(gallery_size: int, budget_bytes: int = SIMILARITY_BYTES) -> int:
    """Queries per similarity chunk so that one chunk's float32 matrix fits ``budget_bytes``."""
    return max(1, budget_bytes // (4 * max(gallery_size, 1)))


def _ranked(similarity: np.ndarray, depth: int) -> np.ndarray:
    """Gallery indices of the ``depth`` most similar items per row, best first (ties: lower index first)."""
    depth = min(depth, similarity.shape[1])
    if depth < similarity.shape[1]:
        # argpartition keeps the top depth (a tie at the boundary may go either way), then a stable sort
        top = np.argpartition(-similarity, depth - 1, axis=1)[:, :depth]
        top.sort(axis=1)  # index order first, so the stable sort below breaks ties by gallery index
    else:
        top = np.broadcast_to(np.arange(depth), similarity.shape).copy()
    order = np.argsort(-np.take_along_axis(similarity, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


def retrieval_metrics(queries: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray,
                      gallery_labels: np.ndarray, ks: tuple[int, ...] = KS,
                      chunk: int | None = None) -> dict[str, float]:
    """recall@k for ``ks`` and mAP@R of ``queries`` against ``gallery`` by cosine similarity.

    Keys: ``recall@1`` ... and ``map@r``, fractions in [0, 1]. Queries whose class is
    absent from the gallery count 0 for both (nothing relevant can be found).
    """
    query_labels = np.asarray(query_labels, np.int64)
    gallery_labels = np.asarray(gallery_labels, np.int64)
    if len(queries) != len(query_labels) or len(gallery) != len(gallery_labels) or not len(gallery):
        raise ValueError("need one label per embedding and a non-empty gallery")
    q, g = l2_normalized(queries), l2_normalized(gallery)
    per_class = np.bincount(gallery_labels, minlength=int(max(query_labels.max(initial=0),
                                                               gallery_labels.max())) + 1)
    r_of_query = per_class[query_labels]
    depth = int(max(max(ks), r_of_query.max(initial=0)))
    hits = {k: 0.0 for k in ks}
    ap_sum = 0.0
    step = chunk or chunk_for(len(g))
    for start in range(0, len(q), step):
        labels = query_labels[start:start + step]
        ranked = _ranked(q[start:start + step] @ g.T, depth)
        relevant = gallery_labels[ranked] == labels[:, None]  # (chunk, depth)
        for k in ks:
            hits[k] += float(relevant[:, :k].any(axis=1).sum())
        r = r_of_query[start:start + step]
        within_r = np.arange(1, relevant.shape[1] + 1) <= r[:, None]
        precision_at_i = np.cumsum(relevant, axis=1) / np.arange(1, relevant.shape[1] + 1)
        ap = (precision_at_i * (relevant & within_r)).sum(axis=1) / np.maximum(r, 1)
        ap_sum += float(ap.sum())
    n = max(len(q), 1)
    return {**{f"recall@{k}": hits[k] / n for k in ks}, "map@r": ap_sum / n}


def embed_images(backend: Any, model: Any, images_uint8: np.ndarray, mean, std, chunk: int = 2048) -> np.ndarray:
    """Embeddings of uint8 NHWC images normalised as the run's pipelines do (common.sampler), in chunks."""
    from common.sampler import normalize_reference

    parts = [backend.embed(model, normalize_reference(images_uint8[i:i + chunk], mean, std))
             for i in range(0, len(images_uint8), chunk)]
    return np.concatenate(parts).astype(np.float32, copy=False)


def run_retrieval_request(backend_name: str, request: str, out: str) -> int:
    """The ``retrieval`` worker task. REQUEST (JSON): ``spec`` (the run's RunSpec), ``weights``
    (its final weights .npz), ``cross`` ({name: weights .npz} of other runs to embed the
    queries with) and ``sha256`` ({.npz: SHA-256 recorded by its run}; a file that differs is refused). Writes to the folder OUT: ``metrics.json``, ``queries.npy`` (the run's own
    query embeddings) and ``cross_<name>.npy`` per entry of ``cross``."""
    from common.config import RunSpec
    from common.data import load_dataset
    from common.registry import get_backend
    from common.weights import load_weights

    raw = json.loads(Path(request).read_text())
    spec = RunSpec.from_dict(raw["spec"])
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    backend = get_backend(backend_name)
    # embeddings in fp32 on both sides, in this one process: a data-parallel run's final weights (the
    # chief's) are embedded without its engine (world 1)
    backend.setup(RunSpec.from_dict({**raw["spec"], "precision": "fp32", "nproc": 1, "nnodes": 1}))
    dataset = load_dataset(spec.data, train_subset=spec.train_subset, test_subset=spec.test_subset,
                           subset_seed=spec.seed, progress=False)
    recipe = spec.recipe

    def model_with(path: str):
        model = backend.build_model(spec.model, dataset.num_classes, dataset.in_shape,
                                    bn_momentum=recipe.bn_momentum, bn_epsilon=recipe.bn_epsilon)
        backend.set_weights(model, load_weights(path, raw.get("sha256", {}).get(path)))
        return model

    model = model_with(raw["weights"])
    started = time.perf_counter()
    queries = embed_images(backend, model, dataset.test_images, recipe.mean, recipe.std)
    gallery = embed_images(backend, model, dataset.train_images, recipe.mean, recipe.std)
    embedded = time.perf_counter()
    metrics = retrieval_metrics(queries, dataset.test_labels, gallery, dataset.train_labels)
    np.save(out_dir / "queries.npy", queries)
    for name, path in (raw.get("cross") or {}).items():
        np.save(out_dir / f"cross_{name}.npy", embed_images(backend, model_with(path), dataset.test_images,
                                                             recipe.mean, recipe.std))
    summary = {**metrics, "embedding_dim": int(queries.shape[1]), "queries": int(len(queries)),
               "gallery": int(len(gallery)), "embed_s": embedded - started,
               "metrics_s": time.perf_counter() - embedded, "data_fingerprint": dataset.fingerprint}
    (out_dir / "metrics.json").write_text(json.dumps(summary))
    return 0
