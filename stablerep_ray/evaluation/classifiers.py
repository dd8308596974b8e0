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

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .datasets import stratified_split

DEFAULT_C_GRID = tuple(float(c) for c in np.logspace(-4, 2, 7))
KNN_BLOCK_ELEMENTS = 2**28  # a kNN similarity block holds at most this many floats (1 GiB)
PROBE_CHUNK_ELEMENTS = 2**22  # a probe chunk (standardised rows, their logits) holds at most this many (16 MiB)


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


class Standardised:
    """Rows ``index`` (default: all) of ``X``, scaled by a per-feature ``mean`` and ``std`` one chunk at
    a time into one reused buffer: the probe never holds a standardised or row-selected copy of a
    feature set, so at ImageNet scale (1.28M x 768, 3.9 GB) it needs the features once, not three
    times, and allocates nothing per pass."""

    def __init__(self, X: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, index: torch.Tensor | None = None):
        self.X, self.mean, self.std, self.index = X, mean, std, index
        self._scale, self._shift = 1 / std, -mean / std  # one fused multiply-add a chunk
        self.rows_per_chunk = max(256, PROBE_CHUNK_ELEMENTS // X.shape[1])
        self._buffer: torch.Tensor | None = None

    @classmethod
    def fitted(cls, X: torch.Tensor, index: torch.Tensor | None = None) -> Standardised:
        """Those rows, by their own mean and std (two passes in float64; a constant feature is only
        centred)."""
        raw = cls(X, X.new_zeros(X.shape[1]), X.new_ones(X.shape[1]), index)
        mean = (sum(part.sum(dim=0, dtype=torch.float64) for _, part in raw.chunks()) / len(raw)).float()
        var = sum(part.sub_(mean).square_().sum(dim=0, dtype=torch.float64) for _, part in raw.chunks()) / len(raw)
        std = var.sqrt().float()
        return cls(X, mean, torch.where(std > 0, std, torch.ones_like(std)), index)

    def like(self, X: torch.Tensor, index: torch.Tensor | None = None) -> Standardised:
        """Rows of ``X`` scaled by this set's statistics (validation and test rows by train's)."""
        return Standardised(X, self.mean, self.std, index)

    def __len__(self) -> int:
        return len(self.X) if self.index is None else len(self.index)

    def chunks(self, rows: int | None = None) -> Iterator[tuple[slice, torch.Tensor]]:
        """(positions, standardised rows) in order, ``rows`` at a time. Each chunk is a view of the
        buffer that the next one overwrites: use it before asking for the next."""
        rows = max(1, min(rows or self.rows_per_chunk, len(self)))  # an empty set: no chunk
        if self._buffer is None or len(self._buffer) < rows:
            self._buffer = self.X.new_empty(rows, self.X.shape[1])
        for start in range(0, len(self), rows):
            at = slice(start, min(start + rows, len(self)))
            out = self._buffer[: at.stop - at.start]
            rows_at = self.X[at] if self.index is None else torch.index_select(self.X, 0, self.index[at], out=out)
            yield at, torch.addcmul(self._shift, rows_at, self._scale, out=out)


def _fit_logistic(
    X: Standardised,
    y: torch.Tensor,
    num_classes: int,
    C: float,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_iter: int = 1000,
    tol: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights ``(d, K)`` and bias ``(K,)`` minimising mean cross-entropy + ``||W||^2 / (2 C n)`` (the
    bias unpenalised) over ``X``'s rows and labels ``y``: scikit-learn's objective scaled by
    ``1 / (C n)``, so C means the same. Full-batch L-BFGS with a strong-Wolfe line search, starting
    from ``init`` (the previous C's optimum in a grid search), until no gradient entry exceeds ``tol``
    (scikit-learn's stopping rule and default) or ``max_iter`` iterations. The loss is summed over row
    chunks, so memory is ``chunk x max(d, K)`` whatever n is."""
    n, d = len(X), X.X.shape[1]
    W, b = init if init is not None else (X.X.new_zeros(d, num_classes), X.X.new_zeros(num_classes))
    W, b = W.clone().requires_grad_(), b.clone().requires_grad_()
    rows = max(256, PROBE_CHUNK_ELEMENTS // max(d, num_classes))
    penalty = 1.0 / (C * n)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=tol,
                            tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        total = W.new_zeros(())
        for at, part in X.chunks(rows):
            loss = F.cross_entropy(part @ W + b, y[at], reduction="sum") / n
            loss.backward()
            total += loss.detach()
        reg = 0.5 * penalty * W.square().sum()
        reg.backward()
        return total + reg.detach()

    opt.step(closure)
    return W.detach(), b.detach()


def _predict(X: Standardised, W: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    parts = [(part @ W + b).argmax(dim=1) for _, part in X.chunks()]
    return torch.cat(parts).cpu().numpy() if parts else np.zeros(0, np.int64)


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
    ytr_np, yte_np = (_as_tensor(y, torch.int64).cpu().numpy() for y in (train_labels, test_labels))
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
        sub_train = Standardised.fitted(Xtr, tr_t)
        weights = None
        for i, C in enumerate(grid):  # ascending C, warm-started: each fit starts near the previous optimum
            weights = _fit_logistic(sub_train, ytr[tr_t], num_classes, C, weights, max_iter)
            val_scores[f"{C:g}"] = float(np.mean(_predict(sub_train.like(Xtr, va_t), *weights) == ytr_np[va]))
            report(i + 1, fits)
        best = max(val_scores.values())
        best_C = next(C for C in grid if val_scores[f"{C:g}"] == best)  # smallest C among ties
    train = Standardised.fitted(Xtr)
    weights = _fit_logistic(train, ytr, num_classes, best_C, max_iter=max_iter)
    report(fits, fits)
    preds = _predict(train.like(Xte), *weights)
    return {
        "top1": float(np.mean(preds == yte_np)) if len(yte_np) else float("nan"),
        "mean_per_class": mean_per_class_accuracy(yte_np, preds) if len(yte_np) else float("nan"),
        "C": best_C,
        "val_top1": val_scores,
        "device": str(device),
    }
