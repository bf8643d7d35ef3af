"""common.retrieval against hand-computed values and a brute-force reference; compare.retrieval's tables."""
from __future__ import annotations

import numpy as np
import pytest

from common.retrieval import chunk_for, l2_normalized, retrieval_metrics

# Gallery of four 2-D embeddings: labels 0, 1, 0, 1. Cosine rankings worked out by hand:
#   q0 = (1, 0.1), class 0: g0 .995, g2 .774, g1 .100, g3 -.995 -> relevant 1 1 0 0
#   q1 = (1, 0.9), class 1: g2 .999, g0 .743, g1 .669, g3 -.743 -> relevant 0 0 1 1
#   q2 = (0.5, 1), class 1: g2 .949, g1 .894, g0 .447, g3 -.447 -> relevant 0 1 0 1
# R = 2 for both classes. AP@R: q0 (1/1 + 2/2)/2 = 1; q1 0; q2 (0 + 1/2)/2 = 0.25.
GALLERY = np.array([[1, 0], [0, 1], [1, 1], [-1, 0]], np.float32)
GALLERY_LABELS = np.array([0, 1, 0, 1])
QUERIES = np.array([[1, 0.1], [1, 0.9], [0.5, 1]], np.float32)
QUERY_LABELS = np.array([0, 1, 1])


@pytest.mark.parametrize("chunk", [None, 1, 2])
def test_hand_computed_recall_and_map_at_r(chunk):
    metrics = retrieval_metrics(QUERIES, QUERY_LABELS, GALLERY, GALLERY_LABELS, chunk=chunk)
    assert metrics["recall@1"] == pytest.approx(1 / 3)
    assert metrics["recall@5"] == metrics["recall@10"] == 1.0  # k beyond the gallery: all four items
    assert metrics["map@r"] == pytest.approx((1 + 0 + 0.25) / 3)


def test_similarity_is_cosine_not_dot_product():
    # scaling a gallery item changes a dot product ranking, never a cosine one
    scaled = GALLERY * np.array([[1], [50], [1], [1]], np.float32)
    assert retrieval_metrics(QUERIES, QUERY_LABELS, scaled, GALLERY_LABELS) == \
        retrieval_metrics(QUERIES, QUERY_LABELS, GALLERY, GALLERY_LABELS)


def test_ties_go_to_the_lower_gallery_index():
    gallery = np.array([[1, 0], [1, 0], [0, 1]], np.float32)  # items 0 and 1 tie for every query
    query = np.array([[1, 0]], np.float32)
    assert retrieval_metrics(query, [1], gallery, [1, 0, 0], ks=(1,))["recall@1"] == 1.0
    assert retrieval_metrics(query, [0], gallery, [1, 0, 0], ks=(1,))["recall@1"] == 0.0


def _brute_force(queries, query_labels, gallery, gallery_labels, k):
    sims = l2_normalized(queries) @ l2_normalized(gallery).T
    recall, aps = [], []
    for row, label in zip(sims, query_labels):
        relevant = gallery_labels[np.argsort(-row, kind="stable")] == label
        r = int((gallery_labels == label).sum())
        recall.append(relevant[:k].any())
        aps.append(sum(relevant[:i].mean() for i in range(1, r + 1) if relevant[i - 1]) / r)
    return float(np.mean(recall)), float(np.mean(aps))


def test_chunked_top_r_ranking_equals_a_full_sort():
    rng = np.random.default_rng(0)
    gallery, queries = rng.normal(size=(300, 8)), rng.normal(size=(40, 8))
    gallery_labels, query_labels = rng.integers(0, 5, 300), rng.integers(0, 5, 40)
    gallery[gallery_labels == 2] += 1.5  # some structure, so the metrics are neither 0 nor 1
    metrics = retrieval_metrics(queries, query_labels, gallery, gallery_labels, ks=(5,), chunk=7)
    recall, map_r = _brute_force(queries, query_labels, gallery, gallery_labels, 5)
    assert metrics["recall@5"] == pytest.approx(recall) and metrics["map@r"] == pytest.approx(map_r)
    assert 0.05 < map_r < 0.95


def test_similarity_chunks_fit_the_memory_budget():
    assert chunk_for(50_000) * 50_000 * 4 <= 64 << 20 and chunk_for(10) >= 1
    with pytest.raises(ValueError):
        retrieval_metrics(QUERIES, QUERY_LABELS[:2], GALLERY, GALLERY_LABELS)
