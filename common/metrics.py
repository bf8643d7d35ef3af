"""Metrics computed once, in numpy, from predictions both backends return.

Neither framework's metric objects are used, so batch-mean artefacts and
dropped remainders cannot make the two sides disagree.
"""
from __future__ import annotations

import math

import numpy as np


def cross_entropy(logits: np.ndarray, labels: np.ndarray, label_smoothing: float = 0.0) -> float:
    """Mean softmax cross-entropy of float logits (N, K) against int labels (N,), in float64."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    n, k = z.shape
    nll = -log_probs[np.arange(n), labels]
    if label_smoothing:
        nll = (1 - label_smoothing) * nll - label_smoothing * log_probs.mean(axis=1)
    return float(nll.mean())


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((np.argmax(logits, axis=1) == labels).mean())


def confusion_matrix(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 (K, K): rows are true classes, columns predicted classes."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def per_class_scores(matrix: np.ndarray) -> dict[str, list[float]]:
    """Precision, recall, F1 and support per class from a confusion matrix (0 where undefined)."""
    tp = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0).astype(np.float64)
    actual = matrix.sum(axis=1).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {"precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(),
            "support": actual.astype(int).tolist()}


def classification_report(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """Everything the result stores about final predictions."""
    predictions = np.argmax(logits, axis=1)
    matrix = confusion_matrix(predictions, labels, num_classes)
    return {"accuracy": top1_accuracy(logits, labels), "loss": cross_entropy(logits, labels),
            "confusion_matrix": matrix.tolist(), "per_class": per_class_scores(matrix)}


def median_ci(values, confidence: float = 0.95) -> tuple[float, float, float]:
    """Median and a distribution-free confidence interval from order statistics.

    The interval [x_(j), x_(k)] uses the binomial(n, 1/2) quantiles, so it makes
    no normality assumption (step times are skewed). With fewer than 6 values
    the interval is the full range.
    """
    x = np.sort(np.asarray(values, np.float64))
    n = len(x)
    if n == 0:
        return (math.nan, math.nan, math.nan)
    median = float(np.median(x))
    if n < 6:
        return median, float(x[0]), float(x[-1])
    z = _normal_quantile(0.5 + confidence / 2)
    half = z * math.sqrt(n) / 2
    lo = max(0, int(math.floor(n / 2 - half)))
    hi = min(n - 1, int(math.ceil(n / 2 + half)) - 1)
    return median, float(x[lo]), float(x[hi])


def _normal_quantile(p: float) -> float:
    """Inverse standard normal CDF by bisection on erf (stdlib only, exact enough)."""
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def percentile(values, q: float) -> float:
    values = np.asarray(values, np.float64)
    return float(np.percentile(values, q)) if len(values) else math.nan
