"""Classifiers on frozen features (paper notes, "Evaluation protocols").

* **kNN** (DINO): L2-normalised features, cosine similarity to a memory bank (the train set), the
  top-k neighbours vote for their class with weight ``exp(sim / T)``; k=20, T=0.07. Torch, chunked
  over queries: cheap enough to run online on rank 0 every N steps.
* **Linear probe**: logistic regression (L-BFGS, multinomial) on standardised features; C is chosen
  from a log grid on a held-out stratified split of *train*, then the probe is refitted on the whole
  train set and scored on test (top-1 and mean per-class accuracy).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .datasets import stratified_split

DEFAULT_C_GRID = tuple(float(c) for c in np.logspace(-4, 2, 7))


def _as_tensor(x, dtype=torch.float32) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype)


def knn_classify(
    train_features,
    train_labels,
    test_features,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """DINO-style weighted kNN: cosine similarity, top-k neighbours, votes ``exp(sim / T)``.

    Chunked over queries (memory ``chunk_size x N_train``); runs on the train features' device.
    Returns int64 predictions ``(N_test,)``.
    """
    bank = F.normalize(_as_tensor(train_features), dim=1)
    labels = _as_tensor(train_labels, torch.int64).to(bank.device)
    queries = F.normalize(_as_tensor(test_features).to(bank.device), dim=1)
    if len(bank) == 0:
        raise ValueError("knn_classify: the train (memory bank) set is empty")
    if bank.shape[1] != queries.shape[1]:
        raise ValueError(f"feature dims differ: train {bank.shape[1]}, test {queries.shape[1]}")
    num_classes = int(num_classes or int(labels.max()) + 1)
    k = max(1, min(int(k), len(bank)))
    preds = []
    for start in range(0, len(queries), chunk_size):
        sim = queries[start : start + chunk_size] @ bank.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(len(sim), num_classes, device=bank.device)
        votes.scatter_add_(1, labels[top_idx], weights)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds).cpu() if preds else torch.zeros(0, dtype=torch.int64)


def knn_accuracy(
    train_features,
    train_labels,
    test_features,
    test_labels,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> float:
    """Top-1 accuracy of ``knn_classify`` on the test set."""
    preds = knn_classify(
        train_features, train_labels, test_features, k, temperature, num_classes, chunk_size
    )
    truth = _as_tensor(test_labels, torch.int64)
    return float((preds == truth).float().mean()) if len(truth) else float("nan")


def mean_per_class_accuracy(labels: np.ndarray, preds: np.ndarray) -> float:
    """Average over the classes present in ``labels`` of each class's accuracy (recall)."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    return float(np.mean([np.mean(preds[labels == c] == c) for c in np.unique(labels)]))


def linear_probe(
    train_features,
    train_labels,
    test_features,
    test_labels,
    Cs: Sequence[float] | None = None,
    val_fraction: float = 0.2,
    max_iter: int = 1000,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Logistic-regression probe (L-BFGS, multinomial) on standardised features.

    C is chosen from ``Cs`` (default ``logspace(-4, 2, 7)``) by accuracy on a held-out stratified
    ``val_fraction`` of train (scaler fitted on the sub-train part), then the probe is refitted on the
    whole train set. Returns ``top1``, ``mean_per_class``, ``C`` and the ``val_top1`` per C.
    ``progress(fits done, fits in all)`` before the first fit and after each: on a large set
    (ImageNet's 1.28M features) each fit takes minutes.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    def arr(x, dtype):
        return (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)).astype(
            dtype
        )

    # float64 (L-BFGS converges more reliably), float32 once that would exceed ~800 MB of features.
    n, d = np.shape(train_features)
    dtype = np.float64 if n * d <= 1e8 else np.float32
    Xtr, ytr = arr(train_features, dtype), arr(train_labels, np.int64)
    Xte, yte = arr(test_features, dtype), arr(test_labels, np.int64)
    if len(np.unique(ytr)) < 2:
        raise ValueError("linear_probe: the train set needs at least two classes")
    grid = sorted(float(c) for c in (Cs or DEFAULT_C_GRID))

    # Small problems run single-threaded: there BLAS/OpenMP thread pools only add synchronisation,
    # and on a busy machine their spinning threads made a digits-sized probe 100x slower.
    small = Xtr.shape[0] * Xtr.shape[1] * max(2, len(np.unique(ytr))) < 5e7

    def fit(X, y, C, warm=None):
        clf = warm or LogisticRegression(C=C, max_iter=max_iter, warm_start=True)
        clf.set_params(C=C)
        with warnings.catch_warnings(), threadpool_limits(limits=1 if small else None):
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(X, y)
        return clf

    val_scores: dict[str, float] = {}
    best_C = grid[len(grid) // 2] if len(grid) > 1 else grid[0]
    tr, va = stratified_split(ytr, val_fraction, seed) if len(grid) > 1 else (None, [])
    search = len(va) > 0 and len(np.unique(ytr[tr])) >= 2
    fits = (len(grid) if search else 0) + 1
    report = progress or (lambda done, total: None)
    report(0, fits)
    if search:
        scaler = StandardScaler().fit(Xtr[tr])
        Xa, Xv = scaler.transform(Xtr[tr]), scaler.transform(Xtr[va])
        clf = None
        for i, C in enumerate(grid):  # ascending C with warm starts: each fit starts near the previous optimum
            clf = fit(Xa, ytr[tr], C, clf)
            val_scores[f"{C:g}"] = float(np.mean(clf.predict(Xv) == ytr[va]))
            report(i + 1, fits)
        best = max(val_scores.values())
        best_C = next(C for C in grid if val_scores[f"{C:g}"] == best)  # smallest C among ties
    scaler = StandardScaler().fit(Xtr)
    clf = fit(scaler.transform(Xtr), ytr, best_C)
    report(fits, fits)
    preds = clf.predict(scaler.transform(Xte)) if len(Xte) else np.zeros(0, np.int64)
    return {
        "top1": float(np.mean(preds == yte)) if len(yte) else float("nan"),
        "mean_per_class": mean_per_class_accuracy(yte, preds) if len(yte) else float("nan"),
        "C": best_C,
        "val_top1": val_scores,
    }
