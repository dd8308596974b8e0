"""Simulator worlds: the ``simple`` world fixes texture and count, turns objects only a little, draws
the attributes a caption leaves out per image, renders its eval sets by the same rules and is named by
config, eval specs and captions alike; the ``default`` world renders exactly as before."""

from __future__ import annotations

import typing

import numpy as np
import pytest

from stablerep_ray.config import SIMULATOR_WORLDS, ConfigError, GeneratorConfig
from stablerep_ray.evaluation import check_eval_data, parse_data_spec
from stablerep_ray.evaluation.specs import parse_simulator
from stablerep_ray.tools import simulator as sim


def test_the_config_names_the_worlds_the_simulator_defines():
    config_worlds = typing.get_args(GeneratorConfig.model_fields["world"].annotation)
    assert set(config_worlds) == set(SIMULATOR_WORLDS) == set(sim.WORLDS)


def test_default_world_is_the_world_without_a_name():
    caption = sim.make_captions(1, seed=3)[0]
    a = sim.generate_caption_images(caption, 7, 3, 2.0, 32, 1)
    b = sim.generate_caption_images(caption, 7, 3, 2.0, 32, 1, world="default")
    assert np.array_equal(a, b)
    default = sim.render_eval_image("shape", 2, 5, 32, world="default")
    assert np.array_equal(sim.render_eval_image("shape", 2, 5, 32), default)


def test_simple_world_fixes_texture_and_count_and_draws_unnamed_attributes_per_image():
    _, named = sim.generate_caption_images("a photo of a star", 11, 8, 50.0, 32, 0, True, world="simple")
    assert {a["texture"] for a in named} == {"solid"} and {a["count"] for a in named} == {"one"}
    assert len({a["color"] for a in named}) > 2 and len({a["background"] for a in named}) > 2  # unnamed: vary
    assert sum(a["shape"] == "star" for a in named) >= 7  # named: kept (w = 50: 1 % mismatches)
    full = sim.generate_caption_images("a red star on a blue background", 12, 8, 50.0, 32, 0, True, world="simple")[1]
    assert sum((a["color"], a["background"]) == ("red", "blue") for a in full) >= 7
    # the default world fixes what a caption leaves out per caption (from its text), as before
    _, default = sim.generate_caption_images("a photo of a star", 11, 8, 50.0, 32, 0, True)
    assert len({a["color"] for a in default}) == 1


def test_simple_world_is_deterministic_and_differs_from_default():
    args = ("a photo of a heart", 4, 3, 4.0, 32, 2)
    a = sim.generate_caption_images(*args, world="simple")
    assert np.array_equal(a, sim.generate_caption_images(*args, world="simple"))
    assert not np.array_equal(a, sim.generate_caption_images(*args))


def test_simple_world_eval_sets_follow_its_rules():
    images, labels, names = sim.render_eval_set("shape", per_class=3, size=32, world="simple")
    assert images.shape == (30, 32, 32, 3) and names == sorted(sim.SHAPES)
    assert not np.array_equal(images, sim.render_eval_set("shape", per_class=3, size=32)[0])
    with pytest.raises(ValueError, match="count.*fixed.*simple"):
        sim.render_eval_set("count", per_class=2, size=32, world="simple")
    with pytest.raises(ValueError, match="world 'nowhere'"):
        sim.render_eval_image("shape", 0, 0, 32, world="nowhere")


def test_eval_specs_name_the_world():
    assert parse_simulator("simulator:shape:simple:test:20") == ("shape", "test", 20, "simple")
    assert parse_simulator("simulator:shape").world == "default"
    assert parse_data_spec("simulator:shape:simple") == ("simulator:shape:simple:train", "simulator:shape:simple:test")
    assert parse_data_spec("simulator:color") == ("simulator:color:train", "simulator:color:test")
    with pytest.raises(ConfigError, match="count is always 'one' in simulator world 'simple'"):
        check_eval_data("simulator:count:simple")
    with pytest.raises(ConfigError, match="generator.world is 'simple'; write simulator:shape:simple"):
        check_eval_data(["simulator:color:simple", "simulator:shape"], simulator_world="simple")
    assert len(check_eval_data(["simulator:color:simple", "simulator:shape:simple"], "simple")) == 2


def test_captions_for_the_simple_world_name_what_it_varies():
    captions = sim.make_captions(400, seed=1, world="simple", shape_only=0.5)
    assert captions == sim.make_captions(400, seed=1, world="simple", shape_only=0.5)
    shape_only = [c for c in captions if c.startswith("a photo of a") and "background" not in c]
    assert 150 < len(shape_only) < 250 and len(set(shape_only)) == len(sim.SHAPES)  # one text per shape
    for c in captions:
        assert not any(t in c.split() for t in ("striped", "dotted", "checkered", "wavy", "two", "three"))
        assert sim.parse_caption(c)["count"] == "one"
    assert set(sim.caption_words()) >= {w for c in captions for w in c.split()}
    # the default world's captions are unchanged by the new options' existence
    assert sim.make_captions(50, seed=1) == sim.make_captions(50, seed=1, world="default", shape_only=0.0)


def test_a_shape_only_warm_up_comes_first():
    captions = sim.make_captions(300, seed=1, world="simple", shape_only=0.5, shape_only_first=100)
    assert all(c.startswith("a photo of a") and "background" not in c for c in captions[:100])
    assert sum("background" in c for c in captions[100:]) > 60
