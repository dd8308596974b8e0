"""Config files that extend others (``base:``): merge rules, errors, and the shipped sweep config."""

import pytest
import yaml
from repo import CONFIGS

from stablerep_ray.config import ConfigError, dump_config, from_dict, load_config
from stablerep_ray.config.io import read_config_file

# configs/sweep-quickstart.yaml as it was written out in full, before it extended quickstart.yaml.
SWEEP_BEFORE_BASE = {
    "name": "quickstart", "output_dir": "outputs",
    "captions": {"source": "data/simulator_captions.txt"},
    "generator": {"backend": "simulator", "images_per_caption": 8, "guidance_scale": 4.0, "output_size": 48,
                  "num_actors": 1, "captions_per_call": 256},
    "stream": {"images_per_group": 4, "reuse": 1},
    "model": {"name": "vit_tiny_patch16_224", "image_size": 32, "kwargs": {"patch_size": 8, "depth": 4},
              "head_hidden_dim": 512, "head_layers": 2, "embed_dim": 128},
    "augment": {"crop_scale": [0.3, 1.0], "color_jitter": [0.4, 0.4, 0.2, 0.02], "grayscale_p": 0.0},
    "train": {"objective": "stablerep", "batch_size": 128, "steps": 200, "base_lr": 6.0e-3, "weight_decay": 0.05,
              "warmup_steps": 10, "num_workers": 2, "log_every": 10, "image_grid_every": 50,
              "checkpoint_every": 50, "keep_checkpoints": 1},
    "eval": {"data": "simulator:color", "every": 50},
    "cluster": {"num_cpus": 9},
    "tune": {"name": "sweep-quickstart",
             "space": {"generator.guidance_scale": [1.0, 8.0], "stream.images_per_group": [2, 4]},
             "seeds": 2, "metric": "eval/knn_top1", "mode": "max", "budget": {"steps": 200},
             "scheduler": {"type": "asha", "grace_period": 100, "reduction_factor": 2}},
}


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_sweep_quickstart_resolves_to_its_former_values():
    assert "base" in yaml.safe_load((CONFIGS / "sweep-quickstart.yaml").read_text())
    resolved = load_config(CONFIGS / "sweep-quickstart.yaml").model_dump(mode="json")
    assert resolved == from_dict(SWEEP_BEFORE_BASE).model_dump(mode="json")


def test_mappings_merge_lists_and_scalars_replace(tmp_path):
    write(tmp_path / "base.yaml", {"model": {"name": "vit_tiny_patch16_224", "kwargs": {"patch_size": 8, "depth": 4}},
                                   "augment": {"crop_scale": [0.3, 1.0], "color_jitter": [0.4, 0.4, 0.2, 0.02]},
                                   "train": {"steps": 50, "batch_size": 64}})
    child = write(tmp_path / "child.yaml", {"base": "base.yaml", "model": {"kwargs": {"depth": 2}},
                                            "augment": {"color_jitter": [0.1, 0.1, 0.1, 0.0]}, "train": {"steps": 7}})
    data = read_config_file(child)
    assert data["model"] == {"name": "vit_tiny_patch16_224", "kwargs": {"patch_size": 8, "depth": 2}}
    assert data["augment"] == {"crop_scale": [0.3, 1.0], "color_jitter": [0.1, 0.1, 0.1, 0.0]}
    assert data["train"] == {"steps": 7, "batch_size": 64}
    assert "base" not in data


def test_bases_are_relative_to_their_file_later_ones_win_and_set_comes_last(tmp_path):
    write(tmp_path / "shared" / "root.yaml", {"train": {"steps": 1, "warmup_steps": 1, "log_every": 3}})
    write(tmp_path / "shared" / "mid.yaml", {"base": "root.yaml", "train": {"steps": 2}})
    # a diamond (two bases sharing one) is no cycle
    write(tmp_path / "shared" / "other.yaml", {"base": "root.yaml", "train": {"steps": 3, "warmup_steps": 0}})
    child = write(tmp_path / "exp" / "run.yaml", {
        "base": ["../shared/mid.yaml", "../shared/other.yaml"],
        "captions": {"source": "x.txt"}, "generator": {"backend": "simulator"},
    })
    assert read_config_file(child)["train"] == {"steps": 3, "warmup_steps": 0, "log_every": 3}
    config = load_config(child, ["train.steps=9"])
    assert (config.train.steps, config.train.warmup_steps, config.train.log_every) == (9, 0, 3)


def test_a_dumped_config_is_the_resolved_one(tmp_path):
    out = tmp_path / "config.yaml"
    config = load_config(CONFIGS / "sweep-quickstart.yaml")
    dump_config(config, out)
    assert "base" not in yaml.safe_load(out.read_text())
    assert load_config(out) == config


@pytest.mark.parametrize("files,expected", [
    ({"a.yaml": {"base": "a.yaml"}}, r"a\.yaml: base: 'a\.yaml' closes a cycle \(.*a\.yaml -> .*a\.yaml\)"),
    ({"a.yaml": {"base": "b.yaml"}, "b.yaml": {"base": ["c.yaml", "a.yaml"]}, "c.yaml": {}},
     r"b\.yaml: base: 'a\.yaml' closes a cycle \(.*a\.yaml -> .*b\.yaml -> .*a\.yaml\)"),
    ({"a.yaml": {"base": "gone.yaml"}}, r"a\.yaml: base: 'gone\.yaml' not found \(looked for .*gone\.yaml\)"),
    ({"a.yaml": {"base": {"file": "b.yaml"}}}, r"a\.yaml: base: expected a config file path or a list"),
])
def test_bad_bases_are_one_line_errors(tmp_path, files, expected):
    for name, data in files.items():
        write(tmp_path / name, data)
    with pytest.raises(ConfigError, match=expected):
        load_config(tmp_path / "a.yaml")


def test_a_cycle_exits_2_from_the_command_before_ray(tmp_path, capsys):
    import ray

    from stablerep_ray.cli import main

    write(tmp_path / "a.yaml", {"base": "b.yaml"})
    write(tmp_path / "b.yaml", {"base": "a.yaml"})
    assert main(["train", str(tmp_path / "a.yaml"), "--output-dir", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "closes a cycle" in lines[0] and lines[0].startswith("error: "), lines
    assert not ray.is_initialized() and not (tmp_path / "out").exists()

