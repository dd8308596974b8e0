"""``model.stem: conv``: the same token grid as timm's patch embedding, built from stride-2
convolutions, through every path that builds or rebuilds a model (training, checkpoints, SynCLR's
variable-size crops); refused where it cannot work (non-power-of-two patches, timm export)."""

import pytest
import torch
from repo import QUICKSTART

from stablerep_ray.cli import main
from stablerep_ray.config import ConfigError, load_config
from stablerep_ray.models import build_model, save_model
from stablerep_ray.models.io import load_model


def _config(**model):
    return load_config(QUICKSTART, [f"model.{k}={v}" for k, v in model.items()])


def test_conv_stem_keeps_the_token_grid_and_trains_every_layer():
    torch.manual_seed(0)
    patch, conv = build_model(_config()), build_model(_config(stem="conv"))
    x = torch.randn(4, 3, 32, 32)
    assert patch.encoder.patch_embed(x).shape == conv.encoder.patch_embed(x).shape == (4, 16, 192)
    strides = [m.stride[0] for m in conv.encoder.patch_embed.proj if isinstance(m, torch.nn.Conv2d)]
    assert strides == [2, 2, 2, 1]  # patch 8 = three halvings, then the 1x1 projection
    conv(x).sum().backward()
    assert all(p.grad is not None for p in conv.encoder.patch_embed.parameters())


def test_conv_stem_survives_a_checkpoint(tmp_path):
    config = _config(stem="conv")
    torch.manual_seed(0)
    model = build_model(config).eval()
    save_model(model, config, tmp_path)
    loaded = load_model(tmp_path)[0].eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.features(x), loaded.features(x))


def test_conv_stem_handles_other_crop_sizes():
    model = build_model(_config(stem="conv"), encoder_kwargs={"dynamic_img_size": True})
    assert model.features(torch.randn(2, 3, 16, 16)).shape == (2, 192)


def test_bad_stems_are_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match="model.stem: 'conv' needs a ViT with a square power-of-two"):
        build_model(_config(stem="conv", kwargs='{"patch_size": 6, "depth": 2}'))
    config = _config(stem="conv")
    (tmp_path / "ckpt").mkdir()
    save_model(build_model(config), config, tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.stem=conv is not a timm architecture" in err[0], err
