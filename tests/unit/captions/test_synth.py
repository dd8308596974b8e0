"""Caption synthesis without Ray: prompts as pure functions of (seed, index), the mix, rule-written
captions the simulator can read, dropped completions, and the file checks that run before Ray starts."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
from repo import CONFIGS, ROOT

from stablerep_ray.captions import EMPTY_CHUNK_ID, caption_id
from stablerep_ray.captions.synth.pools import build_pools, load_pools, with_absolute_paths
from stablerep_ray.captions.synth.prompts import make_prompt, template_caption, with_article
from stablerep_ray.captions.synth.rows import clean_completion, finish_batch
from stablerep_ray.captions.synth.stream import prompt_columns
from stablerep_ray.config import ConfigError, SynthConfig, load_config
from stablerep_ray.config.synth import SYNCLR_MIX
from stablerep_ray.tools.simulator import parse_caption

SYNTH_QUICKSTART = CONFIGS / "synclr-captions-quickstart.yaml"


@pytest.fixture
def cfg() -> SynthConfig:
    synth = load_config(SYNTH_QUICKSTART).captions.synth
    return synth.model_copy(update={
        "concepts": [str(ROOT / c) for c in synth.concepts], "backgrounds": str(ROOT / synth.backgrounds),
        "textures": str(ROOT / synth.textures),
    })


def test_prompt_i_is_a_pure_function_of_seed_and_index(cfg):
    pools = load_pools(cfg)
    forward = [make_prompt(pools, cfg, i) for i in range(300)]
    backward = [make_prompt(build_pools(cfg), cfg, i) for i in reversed(range(300))][::-1]
    assert forward == backward  # any order, any process (fresh pools): the same prompts
    assert len({p.text for p in forward}) > 250 and len({p.seed for p in forward}) == 300
    other = cfg.model_copy(update={"seed": 1})
    assert sum(make_prompt(pools, other, i) == p for i, p in enumerate(forward)) < 30
    # the chunk columns a restart regenerates are the ones the first run had
    again = prompt_columns(cfg, 3, detail=True)
    assert list(again["position"]) == list(range(3 * cfg.prompts_per_chunk, 4 * cfg.prompts_per_chunk))
    assert list(again["caption"]) == [template_caption(make_prompt(pools, cfg, int(i))) for i in again["position"]]


def test_the_prompt_kinds_follow_the_mix_and_the_concept_file_weights(cfg, tmp_path):
    pools = load_pools(cfg)
    kinds = collections.Counter(make_prompt(pools, cfg, i).kind for i in range(20_000))
    for kind, weight in SYNCLR_MIX.items():
        sd = np.sqrt(20_000 * weight * (1 - weight))
        assert abs(kinds[kind] - 20_000 * weight) <= 4 * sd + 1, (kind, kinds)

    (tmp_path / "a.txt").write_text("apple\n")
    (tmp_path / "b.json").write_text(json.dumps({"bus": ["a street"], "boat": ["a lake"]}))
    two = SynthConfig(concepts=[str(tmp_path / "a.txt"), str(tmp_path / "b.json")], concept_weights=[3, 1],
                      mix={"concept": 1})
    drawn = [make_prompt(build_pools(two), two, i) for i in range(4000)]
    assert np.mean([p.concept == "apple" for p in drawn]) == pytest.approx(0.75, abs=0.03)
    assert {p.kind for p in drawn} == {"concept"}
    # concept_background draws a concept's own backgrounds (JSON); "apple" has none, and no backgrounds file
    two = two.model_copy(update={"mix": {"concept": 1, "concept_background": 1}})
    with pytest.raises(ConfigError, match="captions.synth.backgrounds: 1 concepts"):
        build_pools(two)
    two = two.model_copy(update={"concepts": [str(tmp_path / "b.json")], "concept_weights": []})
    assert {p.detail for p in (make_prompt(build_pools(two), two, i) for i in range(200))
            if p.kind == "concept_background"} == {"a street", "a lake"}


def test_a_prompt_is_the_instruction_k_examples_and_the_new_input(cfg):
    prompt = next(p for p in (make_prompt(load_pools(cfg), cfg, i) for i in range(50)) if p.kind == "concept_relation")
    lines = prompt.text.splitlines()
    assert len(lines) == 1 + cfg.num_examples + 1 and len(set(lines[1:-1])) == cfg.num_examples
    assert all(" => " in line for line in lines[1:-1])
    assert lines[-1] == f"{prompt.concept}, {prompt.detail} =>"


def test_template_captions_say_what_the_simulator_renders(cfg):
    pools = load_pools(cfg)
    for i in range(400):
        prompt = make_prompt(pools, cfg, i)
        caption = template_caption(prompt)
        assert caption == template_caption(prompt)  # the rule is drawn from the prompt's own seed
        attributes = parse_caption(caption)
        if prompt.kind in ("concept", "concept_background", "concept_relation"):
            colour, shape = prompt.concept.split()
            assert (attributes["color"], attributes["shape"]) == (colour, shape), caption
        if prompt.kind == "concept_background":
            assert parse_caption(prompt.detail)["background"] == attributes["background"], caption
    assert with_article("orange ring") == "an orange ring" and with_article("a sand background") == "a sand background"


@pytest.mark.parametrize("completion,caption,reason", [
    (" a red star on a sand background\nsecond line => ignored", "a red star on a sand background", None),
    ("  two  cats\tsleeping \n", "two cats sleeping", None),
    ("\na caption after a blank first line", "", "blank"),
    ("   \t ", "", "blank"),
    ("a\x00b\x07c", "abc", None),  # control characters (random byte-level models emit them) are removed
    ("x" * 301, "", "too_long"),
    ("x" * 300, "x" * 300, None),
])
def test_completions_keep_the_first_line_and_blank_or_over_long_ones_are_dropped(completion, caption, reason):
    assert clean_completion(completion, max_chars=300) == (caption, reason)


def test_a_dropped_completion_keeps_its_row_as_a_marker_so_chunks_stay_countable(cfg):
    rows = prompt_columns(cfg.model_copy(update={"backend": "http", "url": "http://x", "prompts_per_chunk": 4}),
                          0, detail=True)
    out = finish_batch(rows, ["a red star", "", "y" * 500, "a blue ring\nmore"], max_chars=300, detail=True)
    kept = [caption_id("a red star"), EMPTY_CHUNK_ID, EMPTY_CHUNK_ID, caption_id("a blue ring")]
    assert list(out["caption_id"]) == kept
    assert list(out["dropped"]) == ["", "blank", "too_long", ""]
    assert list(out["chunk_rows"]) == [4] * 4 and list(out["row"]) == [0, 1, 2, 3]
    assert set(finish_batch(rows, ["a"] * 4, 300, detail=False)) == {
        "chunk", "row", "chunk_rows", "caption_id", "position", "caption"}  # the file captions' columns


BAD = [
    (["captions.synth.mix={concept: 1, sky: 1}"], "captions.synth.mix: unknown prompt kinds ['sky']"),
    (["captions.synth.concepts=[]"], "captions.synth.concepts: the mix uses concept prompts"),
    (["captions.synth.backend=transformers"], "captions.synth.model: the transformers backend needs"),
    (["captions.synth.backend=http"], "captions.synth.url: the http backend needs"),
    (["captions.synth.backend=vllm", "captions.synth.model=m"], "captions.synth.num_gpus_per_actor: vLLM runs on GPUs"),
    (["captions.synth.concept_weights=[1, 2]"], "captions.synth.concept_weights: 2 weights for 1 concepts files"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_bad_synth_settings_are_refused_with_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(SYNTH_QUICKSTART, overrides)


def test_bad_files_are_refused_before_ray_starts(cfg, tmp_path):
    missing = cfg.model_copy(update={"concepts": [str(tmp_path / "nope.txt")]})
    with pytest.raises(ConfigError, match="captions.synth.concepts: .*nope.txt does not exist"):
        build_pools(missing)
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    with pytest.raises(ConfigError, match="holds no concepts"):
        build_pools(cfg.model_copy(update={"concepts": [str(tmp_path / "empty.txt")]}))
    (tmp_path / "bad.json").write_text('{"cat": "not a list"}')
    with pytest.raises(ConfigError, match="JSON object of concept -> list of backgrounds"):
        build_pools(cfg.model_copy(update={"concepts": [str(tmp_path / "bad.json")]}))
    (tmp_path / "ex.yaml").write_text("concept: ['red star => a red star on a table']\n")
    few = cfg.model_copy(update={"backend": "transformers", "model": "m", "examples": str(tmp_path / "ex.yaml")})
    with pytest.raises(ConfigError, match="the concept pool has 1 examples, fewer than .*num_examples=3"):
        build_pools(few)
    assert build_pools(few.model_copy(update={"num_examples": 1})).examples["concept"] == (
        "red star => a red star on a table",)
    (tmp_path / "ex.yaml").write_text("sky: ['a => b']\n")
    with pytest.raises(ConfigError, match=r"unknown prompt kinds \['sky'\]"):
        build_pools(few)


def test_relative_paths_are_made_absolute_for_workers_and_trials(monkeypatch):
    monkeypatch.chdir(ROOT)
    synth = with_absolute_paths(load_config(SYNTH_QUICKSTART).captions.synth)
    assert synth.concepts == [str(ROOT / "data/concepts/shapes.txt")] and synth.model == ""


def test_preview_of_the_template_backend_runs_without_ray_and_writes_a_caption_file(monkeypatch, tmp_path, capsys):
    import ray

    from stablerep_ray.captions.files import inspect_captions
    from stablerep_ray.cli import main
    from stablerep_ray.config import CaptionsConfig

    monkeypatch.chdir(ROOT)
    out = tmp_path / "synth.txt"
    assert main(["synth-captions", str(SYNTH_QUICKSTART), "--num", "30", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "     0  concept_background  red star" in printed and "dropped 0 of 30 completions" in printed
    assert not ray.is_initialized()
    assert inspect_captions(CaptionsConfig(source=str(out))).captions == 30  # usable as a caption source
