"""Evaluation: data specs and loaders, kNN and linear-probe correctness, feature extraction, the
end-to-end ``evaluate`` (in-process and streamed through Ray Data, with the feature cache; streamed
features equal to the whole-set in-process reference), the ``eval`` command's options with a URI
checkpoint, and the rejections of bad checkpoints, bad datasets and bad images in the stream."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from stablerep_ray import evaluation as ev
from stablerep_ray.config import ConfigError, EvalConfig, from_dict
from stablerep_ray.evaluation import features as ev_features
from stablerep_ray.models import MODEL_FILE, build_model, save_model
from stablerep_ray.models.io import load_checked_model
from stablerep_ray.tools.simulator import render_eval_set, write_image_folder

TINY = {
    "name": "vit_tiny_patch16_224",
    "image_size": 32,
    "kwargs": {"patch_size": 8, "depth": 2},
    "head_hidden_dim": 64,
    "embed_dim": 32,
}


def _config(**model):
    return from_dict(
        {
            "model": {**TINY, **model},
            "generator": {"backend": "simulator"},
            "captions": {"source": "captions.txt"},
            "train": {"batch_size": 12, "num_workers": 2},
        }
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny saved checkpoint (random weights) shared by the module."""
    torch.manual_seed(0)
    config = _config()
    directory = tmp_path_factory.mktemp("ckpt")
    save_model(build_model(config), config, directory)
    return directory


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray for the module. The uv hook is switched off: under `uv run` it would build a
    fresh virtualenv for the workers (minutes); the workers use this interpreter instead."""
    import ray
    import ray._private.ray_constants as ray_constants

    old = ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV
    ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = False
    started = not ray.is_initialized()
    if started:
        from stablerep_ray.process_setup import WORKER_SETUP

        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env=WORKER_SETUP)
    yield ray
    if started:
        ray.shutdown()
    ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = old


# ---------------------------------------------------------------------------------------- specs
@pytest.mark.parametrize(
    "spec, expected",
    [
        ("simulator:shape", ("simulator:shape:train", "simulator:shape:test")),
        ("simulator:shape:30", ("simulator:shape:train:30", "simulator:shape:test:30")),
        ("simulator:shape:train", ("simulator:shape:train", None)),
        ("simulator:color:test:7", ("simulator:color:test:7", None)),
        ("dirA:dirB", ("dirA", "dirB")),
        ("dirA", ("dirA", None)),
        ("s3://bucket/train:s3://bucket/test", ("s3://bucket/train", "s3://bucket/test")),
        ("gs://bucket/data.parquet", ("gs://bucket/data.parquet", None)),
        ("hdfs://nn:8020/a:hdfs://nn:8020/b", ("hdfs://nn:8020/a", "hdfs://nn:8020/b")),
        ("dirA:simulator:shape", ("dirA", "simulator:shape:test")),
        (
            "simulator:shape:simulator:color:10",
            ("simulator:shape:train", "simulator:color:test:10"),
        ),
    ],
)
def test_parse_data_spec(spec, expected):
    assert ev.parse_data_spec(spec) == expected


@pytest.mark.parametrize("spec", ["", "a:b:c", "simulator:", "simulator:shape:0", "a::b"])
def test_parse_data_spec_rejects(spec):
    with pytest.raises(ConfigError):
        ev.parse_data_spec(spec)


def test_check_data_spec(tmp_path):
    assert ev.check_data_spec("simulator:shape") == (
        "simulator:shape:train",
        "simulator:shape:test",
    )
    with pytest.raises(ConfigError, match="unknown simulator attribute"):
        ev.check_data_spec("simulator:flavour")
    with pytest.raises(ConfigError, match="path not found"):
        ev.check_data_spec(f"{tmp_path}/nope")
    assert ev.check_eval_data("simulator:shape") == [ev.check_data_spec("simulator:shape")]
    with pytest.raises(ConfigError, match=r"^eval.data entry 2 of 2: .*unknown simulator attribute 'flavour'"):
        ev.check_eval_data(["simulator:shape", "simulator:flavour"])


def test_set_names_are_short_and_unique():
    specs = ["simulator:color", "simulator:shape:test:20", "simulator:color:8", "/data/cifar/train:/data/cifar/test",
             "s3://bucket/pets.parquet", "imagenet/val/"]
    assert ev.set_names(specs) == ["color", "shape", "color-2", "cifar", "pets", "imagenet"]


def test_stratified_split_is_deterministic_and_stratified():
    labels = np.repeat(np.arange(4), [10, 20, 5, 1])
    tr, te = ev.stratified_split(labels, 0.2, seed=3)
    tr2, te2 = ev.stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(tr, tr2) and np.array_equal(te, te2)
    assert not set(tr) & set(te) and len(tr) + len(te) == len(labels)
    assert np.bincount(labels[te], minlength=4).tolist() == [
        2,
        4,
        1,
        0,
    ]  # the singleton stays in train


# -------------------------------------------------------------------------------------- loaders
def test_image_folder_roundtrip_and_cap(tmp_path):
    images, labels, names = render_eval_set("shape", per_class=3, size=24, split="test")
    write_image_folder(tmp_path / "folder", images, labels, names)
    data = ev.load_labelled_images(str(tmp_path / "folder"), image_size=24)
    assert data.class_names == names
    order = np.lexsort((np.arange(len(labels)), labels))  # files are read class by class
    assert np.array_equal(data.labels, labels[order])
    assert np.array_equal(data.images, images[order])  # PNG is lossless
    capped = ev.load_labelled_images(str(tmp_path / "folder"), max_images=10, image_size=24)
    assert len(capped) == 10 and len(np.unique(capped.labels)) == 10  # class-balanced


def test_image_folder_mixed_sizes_and_modes(tmp_path):
    for cls, size, mode in [
        ("a", (20, 20), "RGB"),
        ("a", (20, 20), "L"),
        ("b", (30, 40), "RGBA"),
        ("b", (20, 20), "P"),
    ]:
        (tmp_path / cls).mkdir(exist_ok=True)
        n = len(list((tmp_path / cls).iterdir()))
        Image.new(mode, size[::-1]).save(tmp_path / cls / f"{n}.png")
    data = ev.load_labelled_images(str(tmp_path), image_size=20)
    assert data.images.shape == (4, 20, 20, 3) and data.images.dtype == np.uint8  # each its S x S view
    assert ev.load_labelled_images(str(tmp_path), image_size=16).images.shape == (4, 16, 16, 3)


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def test_parquet_hf_struct_and_string_labels(tmp_path):
    images, labels, names = render_eval_set("color", per_class=2, size=16)
    struct = pa.array(
        [{"bytes": _png(im), "path": None} for im in images],
        pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    meta = {"info": {"features": {"label": {"_type": "ClassLabel", "names": names}}}}
    table = pa.table({"image": struct, "label": pa.array(labels)}).replace_schema_metadata(
        {"huggingface": json.dumps(meta)}
    )
    pq.write_table(table, tmp_path / "hf.parquet")
    data = ev.load_labelled_images(str(tmp_path / "hf.parquet"), image_size=16)
    assert data.class_names == names and np.array_equal(data.labels, labels)
    assert np.array_equal(data.images, images)

    (tmp_path / "dir").mkdir()
    str_labels = [names[i] for i in labels]
    pq.write_table(
        pa.table({"image": [_png(im) for im in images], "label": str_labels}),
        tmp_path / "dir" / "part-0.parquet",
    )
    data = ev.load_labelled_images(str(tmp_path / "dir"), image_size=16)
    assert (
        data.class_names == sorted(names)
        and [data.class_names[i] for i in data.labels] == str_labels
    )


def test_simulator_spec_loads_the_held_out_set():
    data = ev.load_labelled_images("simulator:shape:test:2", image_size=64)
    images, labels, names = render_eval_set("shape", per_class=2, split="test")
    assert np.array_equal(data.images, images) and np.array_equal(data.labels, labels)
    assert data.class_names == names


# ------------------------------------------------------------------------------ data rejections
def test_missing_path_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"path not found.*ImageFolder"):
        ev.load_labelled_images(str(tmp_path / "missing"), image_size=8)


def test_empty_image_folder_is_rejected(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    with pytest.raises(ConfigError, match=rf"{tmp_path}.*empty.*root/<class>/<image>.png"):
        ev.load_labelled_images(str(tmp_path), image_size=8)


def test_single_class_image_folder_is_rejected(tmp_path):
    images, labels, names = render_eval_set("shape", per_class=2, size=16)
    keep = labels == 0
    write_image_folder(tmp_path, images[keep], labels[keep], names[:1])
    with pytest.raises(
        ConfigError, match=rf"{tmp_path}.*only one class \('circle'\).*at least two"
    ):
        ev.load_labelled_images(str(tmp_path), image_size=8)


def test_images_at_root_are_rejected(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    with pytest.raises(ConfigError, match="one subdirectory per class"):
        ev.load_labelled_images(str(tmp_path), image_size=8)


# ------------------------------------------------------------------------------------------ kNN
def _naive_knn(train, train_labels, test, k, T, num_classes):
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    preds = []
    for q in test:
        sims = [float(q @ t) for t in train]
        top = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * num_classes
        for i in top:
            votes[train_labels[i]] += np.exp(sims[i] / T)
        preds.append(int(np.argmax(votes)))
    return np.array(preds)


def test_knn_matches_naive_loop():
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(30, 5)), rng.normal(size=(12, 5))
    labels = rng.integers(0, 3, size=30)
    for k in (1, 5, 30, 100):
        got = ev.knn_classify(
            train, labels, test, k=k, temperature=0.1, num_classes=3, chunk_size=5
        )
        assert np.array_equal(got.numpy(), _naive_knn(train, labels, test, min(k, 30), 0.1, 3))


def test_knn_blocks_stay_under_the_memory_cap(monkeypatch):
    """A large bank gets fewer queries a block (ImageNet's would be 5 GiB at 1,024 queries): here a cap
    of 90 similarities against a 30-row bank gives blocks of 3 queries, with the same predictions."""
    from stablerep_ray.evaluation import classifiers

    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(30, 5)), rng.normal(size=(12, 5))
    labels = rng.integers(0, 3, size=30)
    blocks = []
    matmul = torch.Tensor.__matmul__
    monkeypatch.setattr(classifiers, "KNN_BLOCK_ELEMENTS", 90)
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: blocks.append(len(a)) or matmul(a, b))
    got = ev.knn_classify(train, labels, test, k=5, temperature=0.1, num_classes=3)
    assert blocks == [3, 3, 3, 3]
    assert np.array_equal(got.numpy(), _naive_knn(train, labels, test, 5, 0.1, 3))


def test_knn_separated_clusters_and_random_labels():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(10, 64)) * 10
    y_train, y_test = rng.integers(0, 10, 2000), rng.integers(0, 10, 1000)
    x_train = centres[y_train] + rng.normal(size=(2000, 64))
    x_test = centres[y_test] + rng.normal(size=(1000, 64))
    assert ev.knn_accuracy(x_train, y_train, x_test, y_test) == 1.0
    acc = ev.knn_accuracy(x_train, rng.permutation(y_train), x_test, y_test, num_classes=10)
    assert 0.05 < acc < 0.16  # chance is 0.1
    # torch inputs (online use) give the same answer
    assert (
        ev.knn_accuracy(
            torch.from_numpy(x_train),
            torch.from_numpy(y_train),
            torch.from_numpy(x_test),
            torch.from_numpy(y_test),
        )
        == 1.0
    )


# --------------------------------------------------------------------------------- linear probe
def test_linear_probe_on_digits_pixels():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=0)
    heard = []
    result = ev.linear_probe(Xtr, ytr, Xte, yte, progress=lambda done, total: heard.append((done, total)))
    assert result["top1"] >= 0.95, result
    assert result["mean_per_class"] >= 0.95
    assert result["C"] in ev.DEFAULT_C_GRID and len(result["val_top1"]) == len(ev.DEFAULT_C_GRID)
    fits = len(ev.DEFAULT_C_GRID) + 1  # one per C on the validation split, then the refit on all of train
    assert heard == [(done, fits) for done in range(fits + 1)]
    assert result["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("C", [1e-3, 1.0, 100.0])
def test_linear_probe_fits_scikit_learns_logistic_regression(C):
    """The torch probe minimises LogisticRegression's objective (C means the same): at one C, on
    standardised digits, the two predict alike and their losses agree."""
    import warnings

    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from stablerep_ray.evaluation.classifiers import Standardised, _fit_logistic

    raw, y = load_digits(return_X_y=True)
    X = StandardScaler().fit_transform(raw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = LogisticRegression(C=C, max_iter=5000, tol=1e-8).fit(X, y)
    train = Standardised.fitted(torch.from_numpy(raw).float())  # the probe standardises as it goes
    W, b = _fit_logistic(train, torch.from_numpy(y), 10, C, max_iter=5000, tol=1e-7)
    logits = torch.from_numpy(X).float() @ W + b

    def objective(logits, W):  # mean cross-entropy + ||W||^2 / (2 C n)
        logits, W = torch.as_tensor(logits).double(), torch.as_tensor(W).double()
        penalty = W.square().sum() / (2 * C * len(y))
        return float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)) + penalty)

    ours = objective(logits, W)
    theirs = objective(reference.decision_function(X), reference.coef_.T)
    assert ours == pytest.approx(theirs, rel=2e-3, abs=1e-4)
    agree = float(np.mean(logits.argmax(1).numpy() == reference.predict(X)))
    assert agree >= 0.99, agree


def test_standardised_rows_match_a_standardised_copy():
    """The probe's chunked view of rows ``index`` equals standardising a copy of them (a constant
    feature only centred), and scales other rows by the same statistics."""
    from stablerep_ray.evaluation.classifiers import Standardised

    rng = np.random.default_rng(0)
    X = rng.normal(50.0, 3.0, size=(1000, 6)).astype(np.float32)
    X[:, 2] = 7.0
    index = rng.permutation(1000)[:700]
    view = Standardised.fitted(torch.from_numpy(X), torch.from_numpy(index))
    view.rows_per_chunk = 128  # several chunks, the last one short
    mean, std = X[index].astype(np.float64).mean(0), X[index].astype(np.float64).std(0)
    std[2] = 1.0
    chunks = [(at, part.clone()) for at, part in view.chunks()]  # each chunk is overwritten by the next
    assert [at.start for at, _ in chunks] == list(range(0, 700, 128))
    got = torch.cat([part for _, part in chunks]).numpy()
    np.testing.assert_allclose(got, (X[index] - mean) / std, atol=1e-4)
    others = torch.cat([part.clone() for _, part in view.like(torch.from_numpy(X)).chunks()]).numpy()
    np.testing.assert_allclose(others, (X - mean) / std, atol=1e-4)
    assert list(view.like(torch.zeros(0, 6)).chunks()) == []  # an empty test set scores as NaN, not an error


# ------------------------------------------------------------------------------------- features
@pytest.mark.parametrize(
    "total, free, asked, expected",
    [
        ({"CPU": 16, "GPU": 8}, {"CPU": 16, "GPU": 8}, (0, None), (8, 1.0)),
        # a job submitted with --entrypoint-num-gpus 1: its driver holds one GPU, the pool takes the rest
        ({"CPU": 16, "GPU": 8}, {"CPU": 15, "GPU": 7}, (0, None), (7, 1.0)),
        ({"CPU": 16, "GPU": 8}, {"CPU": 16, "GPU": 8}, (0, 0.5), (16, 0.5)),
        ({"CPU": 16, "GPU": 8}, {"CPU": 16, "GPU": 0}, (0, None), (1, 1.0)),  # all busy: one actor waits
        ({"CPU": 16, "GPU": 8}, {"CPU": 16, "GPU": 7}, (3, None), (3, 1.0)),  # asked for: as asked
        ({"CPU": 8}, {"CPU": 6}, (0, None), (3, 0.0)),  # no GPUs: half the free CPUs
    ],
)
def test_feature_pool_is_sized_to_the_free_gpus(monkeypatch, total, free, asked, expected):
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: total)
    monkeypatch.setattr(ray, "available_resources", lambda: free)
    assert ev_features.pool_size(*asked) == expected


def test_extract_features_matches_model_and_restores_mode():
    from stablerep_ray.augment.batch import eval_transform

    torch.manual_seed(0)
    model = build_model(_config()).train()
    images = np.random.default_rng(0).integers(0, 256, (5, 40, 48, 3), dtype=np.uint8)
    feats = ev.extract_features(model, images, 32, batch_size=2)
    assert (
        model.training
        and feats.dtype == torch.float32
        and feats.shape == (5, model.encoder.num_features)
    )
    with torch.no_grad():
        expected = model.eval().features(eval_transform(torch.from_numpy(images), 32))
    torch.testing.assert_close(feats, expected, rtol=1e-4, atol=1e-4)


def test_online_knn(checkpoint):
    config = from_dict(
        {**_config().model_dump(), "eval": {"data": "simulator:shape:4", "knn_k": 5}}
    )
    online = ev.OnlineKNN(config)
    (train, test), = online.sets.values()
    assert len(train) == len(test) == 40
    model = build_model(config)
    result = online.evaluate(model, "cpu")
    assert set(result) == {"eval/knn_top1"} and 0.0 <= result["eval/knn_top1"] <= 1.0


# ------------------------------------------------------------------------------- evaluate e2e
def _scalars(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for name in sorted(os.listdir(directory)):
        if name.startswith("events.out.tfevents"):
            acc = EventAccumulator(str(directory / name))
            acc.Reload()
            for tag in acc.Tags()["scalars"]:
                values[tag] = acc.Scalars(tag)[-1].value
    return values


def test_evaluate_in_process_writes_results_and_reuses_cache(checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    results = ev.evaluate(
        checkpoint, "simulator:shape:6", method="both", output=out, use_ray=False, step=7
    )
    saved = json.loads((out / "results.json").read_text())
    assert saved["method"] == "both" and saved["checkpoint"] == str(checkpoint)
    assert saved["num_train"] == saved["num_test"] == 60 and saved["num_classes"] == 10
    assert saved["classes"] == render_eval_set("shape", per_class=1, size=8)[2]
    assert set(saved["metrics"]) == {"knn_top1", "linear_top1", "linear_mean_per_class", "linear_C"}
    assert saved["metrics"] == results["metrics"] and not saved["feature_cache"]["hit"]
    scalars = _scalars(out)
    assert scalars["eval/knn_top1"] == pytest.approx(results["metrics"]["knn_top1"])
    assert scalars["eval/linear_top1"] == pytest.approx(results["metrics"]["linear_top1"])
    caches = sorted(checkpoint.glob("features-*.npz"))
    assert len(caches) == 2 and {str(p) for p in caches} == set(saved["feature_cache"].values()) - {
        False
    }
    mtimes = [p.stat().st_mtime_ns for p in caches]

    def boom(*args, **kwargs):
        raise AssertionError("features recomputed despite the cache")

    monkeypatch.setattr(ev_features, "extract_features", boom)
    monkeypatch.setattr(ev_features, "index_source", boom)
    again = ev.evaluate(checkpoint, "simulator:shape:6", method="knn", use_ray=False)
    assert (
        again["feature_cache"]["hit"]
        and again["metrics"]["knn_top1"] == results["metrics"]["knn_top1"]
    )
    assert [p.stat().st_mtime_ns for p in caches] == mtimes
    assert (checkpoint / "eval" / "results.json").is_file()  # default output dir


def test_evaluate_on_ray_actor_pool_matches_in_process(checkpoint, tmp_path, ray_session):
    cache_dir = tmp_path / "cache"
    results = ev.evaluate(
        checkpoint, "simulator:color:3", output=tmp_path / "out", cache_dir=cache_dir
    )
    assert results["features_via"] == "ray" and not results["feature_cache"]["hit"]
    assert len(list(cache_dir.glob("features-*.npz"))) == 2
    local = ev.compute_feature_sets(
        checkpoint,
        ["simulator:color:train:3", "simulator:color:test:3"],
        use_ray=False,
        cache=False,
    )
    cached = ev.compute_feature_sets(
        checkpoint,
        ["simulator:color:train:3", "simulator:color:test:3"],
        use_ray=True,
        cache_dir=cache_dir,
    )
    for a, b in zip(local, cached, strict=True):
        assert b.cached  # second call: read back, no actor pool
        np.testing.assert_allclose(a.features, b.features, rtol=1e-4, atol=1e-4)
        assert np.array_equal(a.labels, b.labels)
    assert _scalars(tmp_path / "out")["eval/knn_top1"] == pytest.approx(
        results["metrics"]["knn_top1"]
    )
    # on a node that cannot see the checkpoint path, actors load the driver's copy from the object store
    model_ref = ray_session.put((checkpoint / MODEL_FILE).read_bytes())
    actor = ev_features._FeatureActor("/nonexistent/model.pt", 32, 8, [model_ref])
    images = render_eval_set("color", per_class=1, size=16)[0]
    out = actor({"idx": np.arange(len(images)), "image": images})
    expected = ev.extract_features(actor.model, images, 32).numpy()
    np.testing.assert_allclose(out["features"], expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------- checkpoint rejections
def test_checkpoint_state_config_mismatch_is_rejected(checkpoint, tmp_path):
    state = torch.load(checkpoint / MODEL_FILE, weights_only=False)
    state["config"]["model"]["embed_dim"] = 48  # the saved head is 32 wide
    torch.save(state, tmp_path / MODEL_FILE)
    with pytest.raises(ConfigError, match=rf"{tmp_path}.*do not fit the architecture.*save_model"):
        ev.evaluate(tmp_path, "simulator:shape:2", use_ray=False)
    assert not (tmp_path / "eval").exists()


def test_checkpoint_without_model_file_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match=rf"no {MODEL_FILE} found"):
        ev.evaluate(tmp_path, "simulator:shape:2", use_ray=False)
    with pytest.raises(ConfigError, match="path not found"):
        ev.evaluate(tmp_path / "nope", "simulator:shape:2", use_ray=False)


def test_evaluate_rejects_bad_data_and_method(checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="path not found"):
        ev.evaluate(checkpoint, str(tmp_path / "missing"), use_ray=False, output=tmp_path / "o")
    with pytest.raises(ConfigError, match="method"):
        ev.evaluate(checkpoint, "simulator:shape:2", method="svm", use_ray=False)


def test_corrupt_model_file_is_rejected(tmp_path):
    (tmp_path / MODEL_FILE).write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="not a readable stablerep-ray model file"):
        load_checked_model(tmp_path)


def test_evaluate_train_test_folders_align_classes_and_split(checkpoint, tmp_path):
    images, labels, names = render_eval_set("count", per_class=4, size=16)  # one, three, two
    write_image_folder(tmp_path / "train", images, labels, names)
    keep = labels > 0
    write_image_folder(tmp_path / "test", images[keep], labels[keep] - 1, names[1:])  # no "one"
    out = ev.evaluate(
        checkpoint,
        f"{tmp_path}/train:{tmp_path}/test",
        EvalConfig(knn_k=1),
        output=tmp_path / "o",
        use_ray=False,
    )
    assert out["classes"] == names and (out["num_train"], out["num_test"]) == (12, 8)
    assert out["metrics"]["knn_top1"] == 1.0  # test images are train images
    (tmp_path / "test" / "five").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "test" / "five" / "x.png")
    with pytest.raises(ConfigError, match=r"test classes \['five'\] do not occur in the train set"):
        ev.evaluate(checkpoint, f"{tmp_path}/train:{tmp_path}/test", use_ray=False, cache=False)
    split = ev.evaluate(checkpoint, f"{tmp_path}/train", output=tmp_path / "s", use_ray=False)
    assert (split["num_train"], split["num_test"]) == (9, 3)  # stratified 20%: one per class


# ------------------------------------------------------------------- streamed = in-process reference
def _reference_features(checkpoint, images, batch_size=256):
    """Today's path, by hand: the decoded images, whole, through the in-process ``extract_features``."""
    from stablerep_ray.models.io import load_model

    model, _ = load_model(checkpoint)
    return ev.extract_features(model, images, 32, batch_size).numpy()


def test_streamed_features_equal_the_in_process_reference(checkpoint, tmp_path, ray_session):
    images, labels, names = render_eval_set("shape", per_class=3, size=32, split="test")
    write_image_folder(tmp_path / "folder", images, labels, names)
    order = np.lexsort((np.arange(len(labels)), labels))  # ImageFolder: class by class, then by name
    pq.write_table(
        pa.table({"image": [_png(im) for im in images], "label": labels}), tmp_path / "set.parquet"
    )
    folder, table = ev.compute_feature_sets(
        checkpoint, [str(tmp_path / "folder"), str(tmp_path / "set.parquet")], batch_size=8, cache=False
    )
    np.testing.assert_allclose(
        folder.features, _reference_features(checkpoint, images[order], 8), rtol=1e-6, atol=1e-6
    )
    assert np.array_equal(folder.labels, labels[order]) and folder.class_names == names
    np.testing.assert_allclose(
        table.features, _reference_features(checkpoint, images, 8), rtol=1e-6, atol=1e-6
    )
    assert np.array_equal(table.labels, labels)


def test_eval_command_options_and_a_uri_checkpoint(checkpoint, tmp_path, ray_session, capsys):
    from stablerep_ray.cli import main

    out = tmp_path / "out"
    argv = ["eval", "--checkpoint", f"file://{checkpoint}", "--data", "simulator:color:4", "--k", "3",
            "--temperature", "0.2", "--batch-size", "7", "--max-images", "20", "--num-actors", "1",
            "--output", str(out)]
    assert main(argv) == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["knn"] == {"k": 3, "temperature": 0.2} and saved["features_via"] == "ray"
    assert saved["num_train"] == saved["num_test"] == 20  # --max-images caps each set
    copy = out / "checkpoint" / MODEL_FILE  # the URI's model.pt, fetched once, its mtime kept
    assert copy.read_bytes() == (checkpoint / MODEL_FILE).read_bytes()
    assert copy.stat().st_mtime_ns == (checkpoint / MODEL_FILE).stat().st_mtime_ns
    fetched = copy.stat().st_ctime_ns
    assert main(argv) == 0 and copy.stat().st_ctime_ns == fetched  # not fetched again
    assert json.loads((out / "results.json").read_text())["feature_cache"]["hit"]
    assert main([*argv[:2], f"file://{tmp_path}/none", *argv[3:]]) == 2
    assert "no model.pt found there" in capsys.readouterr().err
    assert main([*argv, "--num-gpus", "1", "--max-images", "10"]) == 2  # no GPU here (and no cache hit)
    assert "num_gpus_per_actor=1: the Ray cluster has 0 GPUs" in capsys.readouterr().err


def test_a_bad_image_in_the_stream_is_one_clear_error(checkpoint, tmp_path, ray_session):
    images, labels, names = render_eval_set("shape", per_class=2, size=16)
    write_image_folder(tmp_path, images, labels, names)
    bad = sorted((tmp_path / names[3]).iterdir())[0]
    bad.write_bytes(b"truncated")
    with pytest.raises(ConfigError, match=rf"^{bad}: not a readable image") as err:
        ev.compute_feature_sets(checkpoint, [str(tmp_path)], cache=False, num_actors=1)
    assert "Traceback" not in str(err.value)
