"""``stablerep-ray export``: the encoder loads with plain timm in a process that cannot import this
project, gives the features evaluation computes, and carries the training preprocessing."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from repo import QUICKSTART, ROOT

from stablerep_ray.augment.batch import EVAL_CROP_PCT, IMAGENET_MEAN, IMAGENET_STD
from stablerep_ray.cli import main
from stablerep_ray.config import ConfigError, load_config
from stablerep_ray.models import build_model, save_model
from stablerep_ray.models.export import export_encoder, load_snippet, preprocessing_warning
from stablerep_ray.models.io import MODEL_FILE, load_checked_model, model_file

# Drops the repository (the editable install's path entry) from sys.path, proves the project cannot be
# imported, then runs each printed load snippet and saves the features and timm's data config.
LOADER = r"""
import importlib.util, sys
from pathlib import Path
root, inputs, out, *snippets = sys.argv[1:]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(root)]
assert importlib.util.find_spec("stablerep_ray") is None
import timm, torch
x = torch.load(inputs)
results = []
for snippet in snippets:
    scope = {}
    exec(snippet, scope)
    with torch.no_grad():
        features = scope["model"](x)
    results.append({"features": features, "data": timm.data.resolve_data_config({}, model=scope["model"])})
assert "stablerep_ray" not in sys.modules
torch.save(results, out)
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint of the quickstart's architecture whose default (evaluation) weights are a second,
    differently initialised network, as SynCLR's teacher is."""
    directory = tmp_path_factory.mktemp("checkpoint")
    config = load_config(QUICKSTART)
    torch.manual_seed(0)
    model = build_model(config)
    teacher = build_model(config)
    save_model(model, config, directory, weights={"teacher": teacher}, eval_weights="teacher")
    return directory


def test_exports_load_in_plain_timm_with_the_evaluation_features(checkpoint, tmp_path, capsys):
    hf, single = tmp_path / "hf", tmp_path / "encoder.safetensors"
    assert main(["export", str(checkpoint), str(hf)]) == 0
    printed = capsys.readouterr()
    assert load_snippet(hf, "hf") in printed.out
    assert printed.err.startswith("warning: timm's default preprocessing for vit_tiny_patch16_224 (mean (0.5,")
    assert main(["export", str(checkpoint), str(single), "--weights", "model"]) == 0  # timm: by the name
    assert load_snippet(single, "timm") in capsys.readouterr().out
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", "model.safetensors"]

    x = torch.randn(3, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    proc = subprocess.run(
        [sys.executable, "-I", "-c", LOADER, str(ROOT), str(tmp_path / "x.pt"), str(tmp_path / "out.pt"),
         load_snippet(hf, "hf"), load_snippet(single, "timm")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    from_hf, from_single = torch.load(tmp_path / "out.pt", weights_only=False)

    with torch.no_grad():
        teacher = load_checked_model(checkpoint)[0].features(x)
        student = load_checked_model(checkpoint, "model")[0].features(x)
    assert not torch.allclose(teacher, student, atol=1e-3), "the two weight sets must be told apart"
    torch.testing.assert_close(from_hf["features"], teacher, atol=1e-5, rtol=0)
    torch.testing.assert_close(from_single["features"], student, atol=1e-5, rtol=0)
    for result in (from_hf, from_single):
        data = result["data"]
        assert tuple(data["input_size"]) == (3, 32, 32) and data["crop_pct"] == EVAL_CROP_PCT
        assert tuple(data["mean"]) == IMAGENET_MEAN and tuple(data["std"]) == IMAGENET_STD
        assert data["interpolation"] == "bilinear"


def test_config_json_names_the_architecture_and_not_timms_pretrained_weights(checkpoint, tmp_path):
    cfg = export_encoder(checkpoint, tmp_path / "hf")
    assert cfg == json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["architecture"], cfg["num_classes"]) == ("vit_tiny_patch16_224", 0)
    assert {"patch_size": 8, "depth": 4, "global_pool": "token"}.items() <= cfg["model_args"].items()
    assert "tag" not in cfg["pretrained_cfg"] and "license" not in cfg["pretrained_cfg"]
    same = {**cfg, "pretrained_cfg": {**cfg["pretrained_cfg"], "mean": [0.5] * 3, "std": [0.5] * 3,
                                      "crop_pct": 0.9, "interpolation": "bicubic"}}
    assert preprocessing_warning(same) is None


@pytest.mark.parametrize("out,args,expected", [
    ("encoder.pt", ["--format", "timm"], "name it *.safetensors"),
    ("encoder.safetensors", ["--format", "hf"], "drop --format hf to write one file"),
    ("file", [], "--format hf writes a directory"),
    ("hf", ["--weights", "ema"], "not 'ema'"),
])
def test_bad_exports_are_one_line_errors(checkpoint, tmp_path, capsys, out, args, expected):
    (tmp_path / "file").write_text("x")
    assert main(["export", str(checkpoint), str(tmp_path / out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    with pytest.raises(ConfigError, match="no model.pt found"):
        export_encoder(tmp_path, tmp_path / "hf")


@pytest.mark.parametrize("fmt", ["hf", "timm"])
def test_an_interrupted_export_leaves_the_old_files_not_half_a_new_one(checkpoint, tmp_path, monkeypatch, fmt):
    """Ctrl-C (or SIGTERM, which the CLI maps to it) in the middle of writing the weights: the export's
    earlier files are still whole, and nothing else is left in the directory."""
    import safetensors.torch

    out = tmp_path / ("hf" if fmt == "hf" else "encoder.safetensors")
    export_encoder(checkpoint, out, fmt)
    before = {p.name: p.read_bytes() for p in (out.iterdir() if fmt == "hf" else [out])}

    def cut_off(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", cut_off)
    with pytest.raises(KeyboardInterrupt):
        export_encoder(checkpoint, out, fmt, weights="model")
    after = {p.name: p.read_bytes() for p in (out.iterdir() if fmt == "hf" else [out])}
    assert after == before
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(
        ["hf", *before] if fmt == "hf" else [out.name])


def test_a_run_directory_is_answered_with_its_last_checkpoint(tmp_path):
    """What people pass first: the run's directory. The error names the checkpoint to pass instead,
    the last one that holds a model (a torn write holds none)."""
    for name in ("checkpoint_00000002", "checkpoint_00000010", "checkpoint_00000012"):
        (tmp_path / "run" / name).mkdir(parents=True)
    for name in ("checkpoint_00000002", "checkpoint_00000010"):
        (tmp_path / "run" / name / MODEL_FILE).write_bytes(b"")
    with pytest.raises(ConfigError, match=rf"no model.pt found; it is a run directory: pass one of its "
                                          rf"checkpoints, the last is {tmp_path}/run/checkpoint_00000010$"):
        model_file(tmp_path / "run")
