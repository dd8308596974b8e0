"""Configuration: schema, overrides, and invalid configs rejected before Ray starts."""

import subprocess
import sys

import pytest
import yaml
from repo import ROOT

from stablerep_ray.config import ConfigError, load_config, reference_markdown

QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def test_shipped_configs_validate():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        config = load_config(path)
        assert config.train.batch_size % (config.group_size * config.train.num_workers) == 0, path


def test_overrides_are_typed_and_nested():
    config = load_config(QUICKSTART, ["train.steps=7", "generator.guidance_scale=3.5", "model.kwargs.depth=2"])
    assert config.train.steps == 7 and config.generator.guidance_scale == 3.5
    assert config.model.kwargs == {"patch_size": 8, "depth": 2}


def test_eval_data_is_one_spec_or_a_list(tmp_path):
    one = load_config(QUICKSTART, ["eval.data=simulator:shape"]).eval
    assert one.data == "simulator:shape" and one.data_specs == ["simulator:shape"]
    assert load_config(QUICKSTART, ["eval.data="]).eval.data_specs == []
    listed = load_config(QUICKSTART, ["eval.data=[simulator:color, simulator:shape]"]).eval
    assert listed.data_specs == ["simulator:color", "simulator:shape"]
    path = tmp_path / "sets.yaml"
    path.write_text(yaml.safe_dump({"base": str(QUICKSTART), "eval": {"data": ["simulator:count", "simulator:shape"]}}))
    assert load_config(path).eval.data == ["simulator:count", "simulator:shape"]
    with pytest.raises(ConfigError, match=r"^eval.data: expected one spec or a list of specs"):
        load_config(QUICKSTART, ["eval.data=[simulator:color, 3]"])


def test_reference_lists_every_section():
    table = reference_markdown()
    for key in ("captions.source", "generator.guidance_scale", "stream.reuse", "train.batch_size", "eval.knn_k"):
        assert f"`{key}`" in table


BAD = [
    (["train.batchsize=10"], "train.batchsize: unknown key"),
    (["train.steps=many"], "train.steps"),
    (["stream.images_per_group=1"], "stream.images_per_group"),
    (["generator.guidance_scale=-1"], "generator.guidance_scale"),
    (["train.batch_size=130"], "train.batch_size"),
    (["stream.images_per_group=16"], "stream.images_per_group"),
    (["train.num_workers=9"], "train.num_workers"),
    (["generator.num_actors=3", "generator.num_gpus_per_actor=1"], "generator.num_actors"),
    (["train.use_gpu=true"], "train.num_workers"),
    (["train.use_gpu=true", "train.gpus_per_worker=0.5"], "train.gpus_per_worker: 0.5 lets Ray place several DDP"),
    (["captions.source=/nonexistent/captions.txt"], "captions.source"),
    (["eval.data=[simulator:color, simulator:colr]"], "eval.data entry 2 of 2: eval data 'simulator:colr"),
]


def _train_args(overrides, tmp_path):
    sets = [arg for o in overrides for arg in ("--set", o)]
    if "train.num_workers=9" in overrides:
        sets += ["--set", "train.batch_size=144", "--set", "stream.images_per_group=4"]
    return ["train", str(QUICKSTART), *sets, "--set", "cluster.num_gpus=0", "--output-dir", str(tmp_path)]


@pytest.mark.parametrize("overrides,expected", BAD)
def test_invalid_config_exits_before_ray_starts(overrides, expected, tmp_path, capsys, monkeypatch):
    import ray

    from stablerep_ray.cli import main

    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(_train_args(overrides, tmp_path)) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], lines
    assert not ray.is_initialized()
    assert not any(tmp_path.iterdir()), "nothing may be written for a rejected config"


def test_cli_exit_code_and_single_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "stablerep_ray.cli", *_train_args(["stream.images_per_group=1"], tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: stream.images_per_group")


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(path)
    path.write_text(yaml.safe_dump({"train": {"steps": 0}}))
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(path, ["captions.source=x", "generator.backend=simulator"])


def test_readme_reference_is_the_schema():
    """The README's configuration table is `stablerep-ray config-reference`, not a copy that drifts."""
    readme = (ROOT / "README.md").read_text()
    assert reference_markdown() in readme, "regenerate it: stablerep-ray config-reference"


@pytest.mark.parametrize("reuse,mb,need", [(1, 0.5, 1), (4, 1, 4)])
def test_a_replay_buffer_too_small_is_refused_with_the_size_that_works(reuse, mb, need):
    """The quickstart's K = 16 groups of 8 x 48 x 48 x 3 bytes: one step needs 16 groups, R = 4 needs 64."""
    overrides = [f"stream.reuse={reuse}", f"stream.buffer_mb={mb}"]
    with pytest.raises(ConfigError, match=rf"^stream\.buffer_mb: .*set it to at least {need} or to 0 \(auto\)"):
        load_config(ROOT / "configs" / "quickstart.yaml", overrides)
    config = load_config(ROOT / "configs" / "quickstart.yaml", [f"stream.reuse={reuse}", f"stream.buffer_mb={need}"])
    assert config.buffer_groups >= reuse * config.captions_per_worker_step


def test_a_config_error_raised_in_ray_is_found_behind_the_error_ray_raises():
    """Ray passes a remote failure on as its own error (the cause's class mixed in, its text a
    traceback), Train as a worker group's or controller's error: the one line is found in each."""
    import ray.exceptions
    from ray.train import ControllerError, WorkerGroupError

    refusal = ConfigError("generator.model: x is gated; accept its terms")
    try:
        raise refusal
    except ConfigError:
        import traceback

        remote_text = traceback.format_exc()
    remote = ray.exceptions.RayTaskError("GeneratorActor.__init__", remote_text, refusal).as_instanceof_cause()
    died = ray.exceptions.ActorDiedError()
    died.__context__ = remote  # the actor pool's error, raised while handling the actor's
    group = WorkerGroupError("Training failed due to worker errors", {0: died, 1: remote})
    for error in (refusal, remote, died, group, ControllerError(refusal), RuntimeError(f"in a log:\n{remote_text}")):
        found = ConfigError.raised_in(error)
        assert type(found) is ConfigError and str(found) == str(refusal), type(error)
    assert ConfigError.raised_in(WorkerGroupError("Training failed", {0: RuntimeError("CUDA out of memory")})) is None
