"""The offline text-to-image simulator: captions, determinism, the generator contract, the guidance
trade-off (diversity falls and fidelity rises with w) and the held-out evaluation set."""

from __future__ import annotations

import hashlib
import itertools
import time

import numpy as np
import pytest
from PIL import Image

from stablerep_ray.config import GeneratorConfig
from stablerep_ray.tools import simulator as sim


def _config(**kw) -> GeneratorConfig:
    base = dict(backend="simulator", images_per_caption=3, output_size=32, guidance_scale=2.0, seed=5)
    return GeneratorConfig(**{**base, **kw})


def _batch(ids: list[int], captions: list[str]) -> dict[str, np.ndarray]:
    return {
        "caption_id": np.asarray(ids, dtype=np.int64),
        "caption": np.asarray(captions, dtype=object),
        "position": np.asarray(ids, dtype=np.int64) * 10 + 1,
    }


# -- captions ----------------------------------------------------------------------------------------
def test_make_captions_deterministic_and_cover_vocabulary():
    a = sim.make_captions(600, seed=3)
    assert a == sim.make_captions(600, seed=3)
    assert a != sim.make_captions(600, seed=4)
    assert len(a) == 600 and all(isinstance(c, str) and c for c in a)
    parsed = [sim.parse_caption(c) for c in a]
    for attr, values in sim.ATTRIBUTES.items():
        assert {p[attr] for p in parsed} == set(values), attr
    assert any(c.startswith("an ") or " an " in c for c in a)  # article agreement
    assert not any(" a orange" in c or " a illustration" in c for c in a)


def test_parse_recovers_every_template_exactly():
    rng = np.random.default_rng(0)
    for _ in range(400):
        values = {a: v[rng.integers(len(v))] for a, v in sim.ATTRIBUTES.items()}
        for t in range(len(sim._TEMPLATES)):
            for one in sim._ONE_WORDS:
                text = sim._caption_text(values, t, one)
                assert sim.parse_caption(text) == values, text
                assert all(sim._parse_codes(text)[1]), text  # nothing came from the hash


def test_parse_arbitrary_text_is_deterministic_and_valid():
    for text in ["a cat sitting on a mat", "", "Ein Hund im Park", "x" * 500]:
        p = sim.parse_caption(text)
        assert p == sim.parse_caption(text)
        assert set(p) == set(sim.ATTRIBUTES)
        assert all(p[a] in v for a, v in sim.ATTRIBUTES.items())
    # different texts spread over the attribute space
    shapes = {sim.parse_caption(f"caption number {i}")["shape"] for i in range(200)}
    assert len(shapes) == len(sim.SHAPES)
    # synonyms, case and punctuation; words it knows override the hash
    p = sim.parse_caption("A PAIR of crimson, spotted hearts against a grey backdrop!")
    assert p == {"shape": "heart", "color": "red", "texture": "dotted", "background": "gray", "count": "two"}
    assert sim.parse_caption("a star in the sky")["count"] == "one"
    assert sim.parse_caption("stars in the sky")["count"] in ("two", "three")
    # the background phrase does not steal the object's colour and vice versa
    p = sim.parse_caption("a blue background with three blue rings")
    assert (p["background"], p["color"], p["count"]) == ("blue", "blue", "three")
    assert set(sim.caption_words()) >= {"background", "star", "stars", "red", "striped", "two"}


def test_guidance_formulas_are_smooth_and_monotone():
    ws = np.linspace(0, 50, 101)
    p = np.array([sim.mismatch_probability(w) for w in ws])
    d = np.array([sim.diversity_scale(w) for w in ws])
    assert p[0] == pytest.approx(sim.MISMATCH_P0) and d[0] == pytest.approx(1.0)
    assert np.all(np.diff(p) < 0) and np.all(np.diff(d) < 0)
    assert sim.diversity_scale(sim.DIVERSITY_W0) == pytest.approx(0.5)
    assert sim.mismatch_probability(2.0) == pytest.approx(sim.MISMATCH_P0 / 3)


# -- generator contract and determinism --------------------------------------------------------------
def test_generator_output_contract_and_pass_through():
    caps = sim.make_captions(4, seed=0)
    batch = _batch([7, 3, 11, 0], caps)
    gen = sim.SimulatorGenerator(_config())
    out = gen(batch)
    assert out["images"].shape == (4, 3, 32, 32, 3) and out["images"].dtype == np.uint8
    assert out["num_images"].dtype == np.int32 and out["num_images"].tolist() == [3, 3, 3, 3]
    np.testing.assert_array_equal(out["position"], batch["position"])
    np.testing.assert_array_equal(out["caption_id"], batch["caption_id"])
    assert list(out["caption"]) == caps
    assert "images" not in batch  # the input batch is not modified
    # numpy string columns (what Ray Data may hand over) and bytes work too
    out2 = gen({**batch, "caption": np.asarray(caps)})
    np.testing.assert_array_equal(out2["images"], out["images"])
    as_bytes = np.asarray([c.encode() for c in caps], dtype=object)
    out3 = gen({**batch, "caption": as_bytes})
    np.testing.assert_array_equal(out3["images"], out["images"])
    # an empty batch
    empty = gen(_batch([], []))
    assert empty["images"].shape == (0, 3, 32, 32, 3) and empty["num_images"].shape == (0,)
    with pytest.raises(KeyError, match="caption_id"):
        gen({"caption": np.asarray(caps, dtype=object)})


def test_images_depend_only_on_seed_caption_id_and_index():
    caps = sim.make_captions(5, seed=1)
    ids = [40, 2, 17, 9, 123456789012]
    gen = sim.SimulatorGenerator(_config())
    full = gen(_batch(ids, caps))["images"]
    # other batch order and composition, a fresh instance: identical images per caption id
    order = [3, 0, 4]
    fresh = sim.SimulatorGenerator(_config())
    part = fresh(_batch([ids[i] for i in order], [caps[i] for i in order]))["images"]
    for k, i in enumerate(order):
        np.testing.assert_array_equal(part[k], full[i])
    single = gen(_batch([ids[1]], [caps[1]]))["images"][0]
    np.testing.assert_array_equal(single, full[1])
    # image j does not depend on n
    more = sim.SimulatorGenerator(_config(images_per_caption=5))(_batch(ids[:2], caps[:2]))["images"]
    np.testing.assert_array_equal(more[:, :3], full[:2])
    # different j, caption id or base seed -> different images
    for b in range(len(ids)):
        for j, k in itertools.combinations(range(3), 2):
            assert not np.array_equal(full[b, j], full[b, k])
    same_text = gen(_batch([1, 2], [caps[0], caps[0]]))["images"]
    assert not np.array_equal(same_text[0], same_text[1])
    other_seed = sim.SimulatorGenerator(_config(seed=6))(_batch(ids, caps))["images"]
    assert not np.array_equal(other_seed, full)
    # negative ids are accepted (mapped into SeedSequence's non-negative range)
    assert gen(_batch([-3], caps[:1]))["images"].shape == (1, 3, 32, 32, 3)


def test_images_follow_the_caption():
    """At high guidance the images show what the caption says (checked on pixels, via hue)."""
    caps = sim.make_captions(40, seed=2)
    hits = 0
    for i, c in enumerate(caps):
        imgs = sim.generate_caption_images(c, i, 2, guidance_scale=50.0, size=48)
        hits += sum(_dominant_color(im) == sim.parse_caption(c)["color"] for im in imgs)
    assert hits / 80 >= 0.9


# -- guidance-scale trade-off --------------------------------------------------------------------------
_HUES = {
    name: _h
    for name, _h in zip(
        sim.COLORS,
        np.degrees(
            np.arctan2(
                np.sqrt(3) * (sim._COLOR_RGB[:, 1] - sim._COLOR_RGB[:, 2]),
                2 * sim._COLOR_RGB[:, 0] - sim._COLOR_RGB[:, 1] - sim._COLOR_RGB[:, 2],
            )
        ),
    )
}


def _dominant_color(img: np.ndarray) -> str | None:
    """Palette colour nearest in hue to the saturated pixels unlike the border (background)."""
    im = img.astype(np.float32) / 255
    border = np.concatenate([im[0], im[-1], im[:, 0], im[:, -1]])
    x = im.reshape(-1, 3)
    mx, mn = x.max(1), x.min(1)
    sat = (mx - mn) / np.maximum(mx, 1e-6)
    far = np.abs(x - np.median(border, 0)).sum(1) > 0.3  # not background
    keep = (sat > 0.4) & (mx > 0.25) & far
    if keep.sum() < 4:
        return None
    r, g, b = x[keep].T
    ang = np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b)
    mean = np.degrees(np.arctan2(np.sin(ang).mean(), np.cos(ang).mean()))
    dist = {n: abs((mean - h + 180) % 360 - 180) for n, h in _HUES.items()}
    return min(dist, key=dist.get)


def _stats(w: float, caps: list[str], n: int = 4, size: int = 32) -> tuple[float, float, float]:
    """(within-caption mean pixel distance, fraction of images matching the caption on every
    attribute, fraction of images whose recorded colour matches the colour seen in the pixels)."""
    dists, match, seen = [], [], []
    for i, c in enumerate(caps):
        imgs, used = sim.generate_caption_images(c, i, n, w, size, seed=0, return_attributes=True)
        f = imgs.reshape(n, -1).astype(np.float32)
        dists += [np.abs(f[a] - f[b]).mean() for a, b in itertools.combinations(range(n), 2)]
        want = sim.parse_caption(c)
        match += [u == want for u in used]
        seen += [_dominant_color(im) == u["color"] for im, u in zip(imgs, used)]
    return float(np.mean(dists)), float(np.mean(match)), float(np.mean(seen))


def test_guidance_trades_diversity_for_fidelity():
    caps = sim.make_captions(120, seed=9)
    ws = [0.5, 2.0, 8.0, 16.0]
    stats = [_stats(w, caps) for w in ws]
    diversity = [s[0] for s in stats]
    fidelity = [s[1] for s in stats]
    assert all(a > b for a, b in zip(diversity, diversity[1:])), diversity
    assert all(a < b for a, b in zip(fidelity, fidelity[1:])), fidelity
    assert diversity[0] > 1.5 * diversity[-1]
    for w, f in zip(ws, fidelity):  # the documented formula, within sampling error (480 images)
        assert f == pytest.approx((1 - sim.mismatch_probability(w)) ** 5, abs=0.08)
    # the attributes recorded for an image are the ones drawn: its colour is visible in the pixels,
    # including the mismatched ones at low guidance
    assert all(s[2] >= 0.9 for s in stats), [s[2] for s in stats]


def test_rendering_is_fast():
    cap = sim.make_captions(1, seed=0)[0]
    sim.generate_caption_images(cap, 0, 2, 2.0, 64)
    t = time.perf_counter()
    sim.generate_caption_images(cap, 0, 50, 2.0, 64)
    assert (time.perf_counter() - t) / 50 < 0.01  # ~0.5 ms in practice; loose for busy CI machines


# -- evaluation set ------------------------------------------------------------------------------------
def _digests(images: np.ndarray) -> set[str]:
    return {hashlib.sha1(im.tobytes()).hexdigest() for im in images}


@pytest.mark.parametrize("attribute", ["shape", "colour", "count"])
def test_eval_set_balanced_deterministic_and_splits_disjoint(attribute):
    images, labels, names = sim.render_eval_set(attribute, per_class=6, size=32, seed=1, split="train")
    key = "color" if attribute == "colour" else attribute
    assert names == sorted(sim.ATTRIBUTES[key])
    assert images.shape == (6 * len(names), 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [6] * len(names)
    again = sim.render_eval_set(attribute, per_class=6, size=32, seed=1, split="train")
    np.testing.assert_array_equal(again[0], images)
    test_images, _, test_names = sim.render_eval_set(attribute, per_class=6, size=32, seed=1, split="test")
    assert test_names == names
    assert len(_digests(images)) == len(images)
    assert not _digests(images) & _digests(test_images)
    other = sim.render_eval_set(attribute, per_class=6, size=32, seed=2, split="train")[0]
    assert not _digests(images) & _digests(other)


def test_eval_labels_are_visible():
    images, labels, names = sim.render_eval_set("color", per_class=8, size=48, seed=0, split="test")
    seen = [_dominant_color(im) == names[y] for im, y in zip(images, labels)]
    assert np.mean(seen) >= 0.9


def test_eval_set_rejects_bad_arguments():
    with pytest.raises(ValueError, match="attribute"):
        sim.render_eval_set("size", per_class=1)
    with pytest.raises(ValueError, match="split"):
        sim.render_eval_set("shape", per_class=1, split="val")


def test_write_image_folder_round_trip(tmp_path):
    images, labels, names = sim.render_eval_set("count", per_class=4, size=24, seed=0, split="test")
    root = sim.write_image_folder(tmp_path / "eval", images, labels, names)
    dirs = sorted(p.name for p in root.iterdir())
    assert dirs == names
    got_images, got_labels = [], []
    for label, name in enumerate(dirs):  # ImageFolder's convention: sorted directory names
        for f in sorted((root / name).glob("*.png")):
            got_images.append(np.asarray(Image.open(f).convert("RGB")))
            got_labels.append(label)
    assert len(got_images) == len(images)
    order = np.argsort(labels, kind="stable")  # files are written per class in index order
    np.testing.assert_array_equal(np.stack(got_images), images[order])
    np.testing.assert_array_equal(np.asarray(got_labels), labels[order])
