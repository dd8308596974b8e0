"""Evaluation sources without Ray: indexing reads no image, rows decode straight to the model's uint8
S x S view (anywhere in a parquet file), the in-process feature pass holds one block at a time, and
the online kNN bank is capped and stored at the model's input size, and several sets score as each alone."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from stablerep_ray import evaluation as ev
from stablerep_ray.augment.batch import eval_transform
from stablerep_ray.config import ConfigError, from_dict
from stablerep_ray.evaluation import sources
from stablerep_ray.models import build_model, save_model
from stablerep_ray.tools.simulator import render_eval_set, write_image_folder

TINY = {"name": "vit_tiny_patch16_224", "image_size": 32, "kwargs": {"patch_size": 8, "depth": 2},
        "head_hidden_dim": 64, "embed_dim": 32}


def _config(**sections):
    return from_dict({"model": TINY, "generator": {"backend": "simulator"}, "captions": {"source": "c.txt"},
                      "train": {"batch_size": 12, "num_workers": 2}, **sections})


def _png(image: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def test_eval_pixels_is_the_eval_transform_view_rounded():
    image = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    view = ev.eval_pixels(image, 32)
    exact = eval_transform(torch.from_numpy(image), 32, normalize_output=False)[0].permute(1, 2, 0)
    assert view.shape == (32, 32, 3) and view.dtype == np.uint8
    assert np.abs(view / 255.0 - exact.numpy()).max() <= 0.5 / 255 + 1e-6
    square = image[:32, :32]
    assert ev.eval_pixels(square, 32) is square  # already the model's size: untouched


def test_indexing_decodes_nothing_and_a_bad_file_fails_when_read(tmp_path):
    images, labels, names = render_eval_set("shape", per_class=2, size=16)
    write_image_folder(tmp_path, images, labels, names)
    bad = sorted((tmp_path / names[1]).iterdir())[0]
    bad.write_bytes(b"not an image")
    source = ev.index_source(str(tmp_path))  # lists files and labels only
    assert len(source) == len(labels) and source.class_names == names
    row = int(np.flatnonzero(source.paths == str(bad))[0])
    np.testing.assert_array_equal(source.read(16, np.array([0])), images[:1])
    with pytest.raises(ConfigError, match=rf"{bad}: not a readable image.*remove or replace"):
        source.read(16, np.array([row]))


def test_parquet_rows_are_read_from_any_file_and_row_group(tmp_path):
    images, labels, names = render_eval_set("color", per_class=4, size=16)
    half = len(images) // 2
    for part, rows in enumerate((slice(0, half), slice(half, None))):
        table = pa.table({"image": [_png(im) for im in images[rows]], "label": labels[rows]})
        pq.write_table(table, tmp_path / f"part-{part}.parquet", row_group_size=3)
    source = ev.index_source(str(tmp_path), max_images=2 * len(names))  # 2 per class, both files
    assert len(source) == 2 * len(names) and len(set(source.paths)) == 2
    # the first two images of each class, in file order
    order = np.sort(np.concatenate([np.flatnonzero(labels == c)[:2] for c in range(len(names))]))
    np.testing.assert_array_equal(source.labels, labels[order])
    np.testing.assert_array_equal(source.read(16), images[order])
    shuffled = np.random.default_rng(0).permutation(len(source))  # rows out of order, mixed files
    np.testing.assert_array_equal(source.read(16, shuffled), images[order][shuffled])


def test_simulator_rows_render_alone():
    source = ev.index_source("simulator:shape:test:3")
    images, labels, names = render_eval_set("shape", per_class=3, split="test")
    rows = np.array([len(labels) - 1, 0, 4])
    assert source.class_names == names and np.array_equal(source.labels, labels)
    np.testing.assert_array_equal(source.read(64, rows), images[rows])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("ckpt")
    save_model(build_model(_config()), _config(), directory)
    return directory


def test_in_process_pass_holds_one_block_and_matches_the_reference(checkpoint, tmp_path, monkeypatch):
    from stablerep_ray.models.io import load_model

    images, labels, names = render_eval_set("shape", per_class=3, size=32)
    write_image_folder(tmp_path, images, labels, names)
    blocks = []
    read = sources.ImageSource.read

    def spy(self, image_size, rows=slice(None)):
        out = read(self, image_size, rows)
        blocks.append(len(out))
        return out

    monkeypatch.setattr(sources.ImageSource, "read", spy)
    (got,) = ev.compute_feature_sets(checkpoint, [str(tmp_path)], batch_size=7, use_ray=False, cache=False)
    assert max(blocks) == 7 and sum(blocks) == len(labels)
    model, _ = load_model(checkpoint)
    np.testing.assert_allclose(got.features, ev.extract_features(model, images, 32, 7).numpy(),
                               rtol=1e-6, atol=1e-6)  # 32 px files: the same pixels as the old path


def test_resized_images_score_as_the_old_full_resolution_path(checkpoint, tmp_path):
    """Images larger than the model's input are reduced to uint8 S x S as they are decoded; against
    today's path (whole images through eval_transform in float) only that rounding differs."""
    from stablerep_ray.models.io import load_model

    images, labels, names = render_eval_set("shape", per_class=4, size=64)
    write_image_folder(tmp_path, images, labels, names)
    (got,) = ev.compute_feature_sets(checkpoint, [str(tmp_path)], use_ray=False, cache=False)
    model, _ = load_model(checkpoint)
    old = ev.extract_features(model, images, 32).numpy()
    cosine = (got.features * old).sum(1) / np.linalg.norm(got.features, axis=1) / np.linalg.norm(old, axis=1)
    assert cosine.min() > 0.999
    knn = [ev.knn_classify(f, labels, f, k=5).numpy() for f in (got.features, old)]
    assert (knn[0] == knn[1]).mean() >= 0.95


def test_online_knn_bank_is_capped_and_stored_at_the_model_size(tmp_path):
    images, labels, names = render_eval_set("count", per_class=10, size=48)
    write_image_folder(tmp_path, images, labels, names)
    config = _config(eval={"data": str(tmp_path), "online_max_images": 15})
    assert ev.online_cap(config.eval) == 15
    assert ev.online_cap(config.eval.model_copy(update={"max_images": 9})) == 9
    online = ev.OnlineKNN(config)
    (train, test), = online.sets.values()
    assert len(train) + len(test) == 15  # the capped set, split 80/20 before decoding
    for part in (train, test):
        assert part.images.dtype == np.uint8 and part.images.shape[1:] == (32, 32, 3)
    result = online.evaluate(build_model(config), "cpu")
    assert 0.0 <= result["eval/knn_top1"] <= 1.0


def test_online_knn_scores_several_sets_each_as_if_alone():
    torch.manual_seed(0)
    model = build_model(_config())
    sets = ["simulator:color:3", "simulator:shape:3"]
    both = ev.OnlineKNN(_config(eval={"data": sets, "knn_k": 5})).evaluate(model, "cpu")
    alone = [ev.OnlineKNN(_config(eval={"data": spec, "knn_k": 5})).evaluate(model, "cpu") for spec in sets]
    assert all(set(a) == {"eval/knn_top1"} for a in alone)
    assert both == {"eval/knn_top1": alone[0]["eval/knn_top1"], "eval/knn_top1/color": alone[0]["eval/knn_top1"],
                    "eval/knn_top1/shape": alone[1]["eval/knn_top1"]}
