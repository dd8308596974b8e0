"""The linear probe in torch against scikit-learn's LogisticRegression on the same features.

    uv run python -m bench.linear_probe                          # 50,000 x 384 features, 100 classes
    uv run python -m bench.linear_probe --train 100000 --classes 1000
    uv run python -m bench.linear_probe --features CHECKPOINT/features-<hash>.npz   # an eval cache
    uv run python -m bench.linear_probe --device cuda --no-reference --train 1281167 --dim 768 --classes 1000

``stablerep_ray.evaluation.linear_probe`` (full-batch L-BFGS in torch, on the GPU where there is one)
minimises the objective of scikit-learn's ``LogisticRegression`` (L-BFGS, multinomial, float64 on
CPU, what the project used before). Both run the same protocol: standardised features, C from a log
grid chosen on a stratified fifth of train, then a refit on all of train. Prints each one's test top-1,
chosen C and seconds, and their ratio measured in this run.

Synthetic features imitate a network's: class means in a low-dimensional subspace, noise with a
power-law spectrum (the ill-conditioning that makes L-BFGS take hundreds of iterations), so a fit
costs what it costs on real features of that size. ``--features`` scores a real feature cache
(``features-*.npz``, written by ``stablerep-ray eval`` beside the checkpoint) instead.
"""

from __future__ import annotations

import time

import numpy as np

from . import common

MODULE = "bench.linear_probe"


def synthetic(n_train: int, n_test: int, dim: int, classes: int, seed: int = 0):
    """(train X, train y, test X, test y): float32 features, int64 labels."""
    rng = np.random.default_rng(seed)
    rank = min(dim, 32)
    basis = np.linalg.qr(rng.normal(size=(dim, dim)))[0].astype(np.float32)
    means = np.zeros((classes, dim), np.float32)
    means[:, :rank] = rng.normal(size=(classes, rank)) * 0.6
    scale = (np.arange(1, dim + 1, dtype=np.float32) ** -0.5) * 4  # power-law noise spectrum

    def draw(n, rows=2048):  # row blocks: no n x dim float64 temporary to raise the memory high-water mark
        y = rng.integers(0, classes, n)
        x = np.empty((n, dim), np.float32)
        for start in range(0, n, rows):
            block = means[y[start : start + rows]] + rng.normal(size=(len(y[start : start + rows]), dim)) * scale
            x[start : start + rows] = block.astype(np.float32) @ basis.T + 0.5
        return x, y

    return (*draw(n_train), *draw(n_test))


def cached(path: str):
    from stablerep_ray.evaluation.datasets import stratified_split

    data = np.load(path)
    x, y = data["features"].astype(np.float32), data["labels"].astype(np.int64)
    train, test = stratified_split(y, 0.25, 0)
    return x[train], y[train], x[test], y[test]


def sklearn_probe(x_train, y_train, x_test, y_test, max_iter: int = 1000) -> dict:
    """The same protocol with scikit-learn (the project's probe until 2026-11-29)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    from stablerep_ray.evaluation import DEFAULT_C_GRID
    from stablerep_ray.evaluation.datasets import stratified_split

    # as the project's probe did: one BLAS thread below ~5e7 (n x d x K), where more only spin
    small = x_train.shape[0] * x_train.shape[1] * max(2, len(np.unique(y_train))) < 5e7

    def fit(x, y, C, warm=None):
        clf = warm or LogisticRegression(C=C, max_iter=max_iter, warm_start=True)
        clf.set_params(C=C)
        with warnings.catch_warnings(), threadpool_limits(limits=1 if small else None):
            warnings.simplefilter("ignore", ConvergenceWarning)
            return clf.fit(x, y)

    dtype = np.float64 if x_train.size <= 1e8 else np.float32
    x_train, x_test = x_train.astype(dtype), x_test.astype(dtype)
    tr, va = stratified_split(y_train, 0.2, 0)
    scaler = StandardScaler().fit(x_train[tr])
    xa, xv = scaler.transform(x_train[tr]), scaler.transform(x_train[va])
    clf, scores = None, {}
    for C in DEFAULT_C_GRID:
        clf = fit(xa, y_train[tr], C, clf)
        scores[C] = float(np.mean(clf.predict(xv) == y_train[va]))
    best = max(scores.values())
    best_C = next(C for C in DEFAULT_C_GRID if scores[C] == best)
    scaler = StandardScaler().fit(x_train)
    clf = fit(scaler.transform(x_train), y_train, best_C)
    return {"top1": float(np.mean(clf.predict(scaler.transform(x_test)) == y_test)), "C": best_C}


def high_water_mb(device: str | None) -> float:
    """The process's memory high-water mark: allocated GPU memory on CUDA (features moved there
    included), peak RSS on the CPU (features made lean, so the probe's own peak shows above it)."""
    import resource

    import torch

    from stablerep_ray.evaluation.classifiers import classifier_device

    if classifier_device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = common.arg_parser(MODULE, __doc__)
    parser.add_argument("--train", type=int, default=50_000, help="synthetic train features")
    parser.add_argument("--test", type=int, default=0, help="synthetic test features (default: train / 4)")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--features", help="a features-*.npz eval cache in place of synthetic features")
    parser.add_argument("--device", default=None, help="the torch probe's device (default: cuda if present)")
    parser.add_argument("--no-reference", dest="reference", action="store_false",
                        help="skip scikit-learn (hours at ImageNet scale on a CPU)")
    args = parser.parse_args()

    from stablerep_ray.evaluation import linear_probe

    if args.features:
        data, source = cached(args.features), args.features
    else:
        data = synthetic(args.train, args.test or args.train // 4, args.dim, args.classes)
        source = "synthetic"
    n, d = data[0].shape
    classes = len(np.unique(data[1]))
    print(f"{source}: {n:,} train x {d} features, {len(data[2]):,} test, {classes} classes")

    runs = {}
    before = high_water_mb(args.device)
    start = time.perf_counter()
    probe = linear_probe(*data, device=args.device)
    runs["torch"] = {"top1": probe["top1"], "C": probe["C"], "seconds": time.perf_counter() - start,
                     "device": probe["device"], "memory_added_mb": high_water_mb(probe["device"]) - before}
    if args.reference:
        start = time.perf_counter()
        runs["sklearn"] = {**sklearn_probe(*data), "seconds": time.perf_counter() - start, "device": "cpu"}
    print(f"\ncommand: {common.command_line(MODULE)}")
    for name, run in runs.items():
        print(f"  {name:8s} top1 {run['top1']:.4f}  C {run['C']:g}  {run['seconds']:.1f}s on {run['device']}")
    memory = runs["torch"]["memory_added_mb"]
    print(f"  the torch probe raised the {'GPU' if runs['torch']['device'].startswith('cuda') else 'RSS'} "
          f"high-water mark by {memory:,.0f} MB ({memory / (data[0].nbytes / 2**20):.2f}x the train features)")
    result = {"source": source, "train": n, "dim": d, "classes": classes, "test": len(data[2]), "runs": runs}
    if args.reference:
        ratio = runs["sklearn"]["seconds"] / runs["torch"]["seconds"]
        gap = runs["torch"]["top1"] - runs["sklearn"]["top1"]
        result.update(speedup=ratio, top1_gap=gap)
        print(f"  torch is {ratio:.2f}x scikit-learn's speed; top-1 {gap:+.4f}")
    print(f"wrote {common.write_result('linear_probe', result, MODULE)}")


if __name__ == "__main__":
    main()
