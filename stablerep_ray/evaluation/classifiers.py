"""Classifiers on frozen features (paper notes, "Evaluation protocols").

* **kNN** (DINO): L2-normalised features, cosine similarity to a memory bank (the train set), the
  top-k neighbours vote for their class with weight ``exp(sim / T)``; k=20, T=0.07. Torch, chunked
  over queries: cheap enough to run online on rank 0 every N steps.
* **Linear probe**: logistic regression (multinomial, L2) on standardised features; C is chosen
  from a log grid on a held-out stratified split of *train*, then the probe is refitted on the whole
  train set and scored on test (top-1 and mean per-class accuracy). It minimises scikit-learn's
  ``LogisticRegression`` objective, by full-batch L-BFGS in torch, so it runs on a GPU where there is
  one: at ImageNet scale (1.28M x 768 features, 1,000 classes) a CPU fit takes hours.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .datasets import stratified_split

DEFAULT_C_GRID = tuple(float(c) for c in np.logspace(-4, 2, 7))
KNN_BLOCK_ELEMENTS = 2**28  # a kNN similarity block holds at most this many floats (1 GiB)


def classifier_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else CUDA when this process sees a GPU, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


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
    chunk_size: int | None = None,
) -> torch.Tensor:
    """DINO-style weighted kNN: cosine similarity, top-k neighbours, votes ``exp(sim / T)``.

    Chunked over queries (memory ``chunk_size x N_train``; default: up to 1,024 queries, fewer where
    the block would exceed ``KNN_BLOCK_ELEMENTS``, e.g. 209 against ImageNet's 1.28M train features);
    runs on the train features' device. Returns int64 predictions ``(N_test,)``.
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
    chunk_size = chunk_size or max(1, min(1024, KNN_BLOCK_ELEMENTS // len(bank)))
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
    chunk_size: int | None = None,
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


def _fit_logistic(
    X: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    C: float,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_iter: int = 1000,
    tol: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights ``(d, K)`` and bias ``(K,)`` minimising mean cross-entropy + ``||W||^2 / (2 C n)`` (the
    bias unpenalised): scikit-learn's objective scaled by ``1 / (C n)``, so C means the same. Full-batch
    L-BFGS with a strong-Wolfe line search, starting from ``init`` (the previous C's optimum in a grid
    search), until no gradient entry exceeds ``tol`` (scikit-learn's stopping rule and default) or
    ``max_iter`` iterations. The loss is summed over row chunks, so memory is ``chunk x K`` whatever
    n is."""
    n, d = X.shape
    W, b = init if init is not None else (X.new_zeros(d, num_classes), X.new_zeros(num_classes))
    W, b = W.clone().requires_grad_(), b.clone().requires_grad_()
    chunk = max(1024, 2**24 // num_classes)
    penalty = 1.0 / (C * n)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=tol,
                            tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        total = X.new_zeros(())
        for start in range(0, n, chunk):
            part = F.cross_entropy(X[start : start + chunk] @ W + b, y[start : start + chunk], reduction="sum") / n
            part.backward()
            total += part.detach()
        reg = 0.5 * penalty * W.square().sum()
        reg.backward()
        return total + reg.detach()

    opt.step(closure)
    return W.detach(), b.detach()


def _predict(X: torch.Tensor, W: torch.Tensor, b: torch.Tensor, chunk: int = 65536) -> np.ndarray:
    parts = [(X[start : start + chunk] @ W + b).argmax(dim=1) for start in range(0, len(X), chunk)]
    return torch.cat(parts).cpu().numpy() if parts else np.zeros(0, np.int64)


def _standardise(fit_on: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Each input scaled by ``fit_on``'s per-feature mean and std (a constant feature is only centred)."""
    mean, std = fit_on.mean(dim=0), fit_on.std(dim=0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return [(x - mean) / std for x in (fit_on, *others)]


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
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Logistic-regression probe (multinomial, L2, ``_fit_logistic``) on standardised features.

    C is chosen from ``Cs`` (default ``logspace(-4, 2, 7)``) by accuracy on a held-out stratified
    ``val_fraction`` of train (standardised by the sub-train part), then the probe is refitted on the
    whole train set. Runs in float32 on ``device`` (default: CUDA when there is a GPU, else the CPU).
    Returns ``top1``, ``mean_per_class``, ``C``, the ``val_top1`` per C and the ``device``.
    ``progress(fits done, fits in all)`` before the first fit and after each: on a large set each
    fit takes minutes.
    """
    device = classifier_device(device)
    ytr_np = np.asarray(train_labels.cpu() if isinstance(train_labels, torch.Tensor) else train_labels, np.int64)
    yte_np = np.asarray(test_labels.cpu() if isinstance(test_labels, torch.Tensor) else test_labels, np.int64)
    if len(np.unique(ytr_np)) < 2:
        raise ValueError("linear_probe: the train set needs at least two classes")
    Xtr, Xte = (_as_tensor(x).to(device) for x in (train_features, test_features))
    ytr = torch.from_numpy(ytr_np).to(device)
    num_classes = int(max(ytr_np.max(), yte_np.max(initial=0))) + 1
    grid = sorted(float(c) for c in (Cs or DEFAULT_C_GRID))

    val_scores: dict[str, float] = {}
    best_C = grid[len(grid) // 2] if len(grid) > 1 else grid[0]
    tr, va = stratified_split(ytr_np, val_fraction, seed) if len(grid) > 1 else (None, [])
    search = len(va) > 0 and len(np.unique(ytr_np[tr])) >= 2
    fits = (len(grid) if search else 0) + 1
    report = progress or (lambda done, total: None)
    report(0, fits)
    if search:
        tr_t, va_t = torch.from_numpy(tr).to(device), torch.from_numpy(va).to(device)
        Xa, Xv = _standardise(Xtr[tr_t], Xtr[va_t])
        weights = None
        for i, C in enumerate(grid):  # ascending C, warm-started: each fit starts near the previous optimum
            weights = _fit_logistic(Xa, ytr[tr_t], num_classes, C, weights, max_iter)
            val_scores[f"{C:g}"] = float(np.mean(_predict(Xv, *weights) == ytr_np[va]))
            report(i + 1, fits)
        best = max(val_scores.values())
        best_C = next(C for C in grid if val_scores[f"{C:g}"] == best)  # smallest C among ties
        del Xa, Xv
    Xall, Xtest = _standardise(Xtr, Xte)
    weights = _fit_logistic(Xall, ytr, num_classes, best_C, max_iter=max_iter)
    report(fits, fits)
    preds = _predict(Xtest, *weights)
    return {
        "top1": float(np.mean(preds == yte_np)) if len(yte_np) else float("nan"),
        "mean_per_class": mean_per_class_accuracy(yte_np, preds) if len(yte_np) else float("nan"),
        "C": best_C,
        "val_top1": val_scores,
        "device": str(device),
    }
