"""The diffusers backend on every tiny pipeline family, in-process on CPU: from_pretrained of a saved
directory, the model's own settings, seeded images, the StableRep+ tokenizer source."""

import logging

import numpy as np
import pytest
import torch

from stablerep_ray.config import ConfigError, GeneratorConfig
from stablerep_ray.generation.diffusion import DiffusersGenerator, call_args, denoiser
from stablerep_ray.tools.tiny_pipeline import FAMILIES, make_tiny_pipeline

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
# (denoiser, scheduler the actor runs with the config's default sampler, call arguments it fixes,
# native resolution: 2 x the tiny sample size, Flux's pipeline fixes its latent size at 128)
PIXART_ARGS = {"use_resolution_binning": False, "clean_caption": False}
EXPECTED = {
    "sd15": ("unet", "DPMSolverMultistepScheduler", {}, 64),
    "sdxl": ("unet", "DPMSolverMultistepScheduler", {}, 64),
    "pixart": ("transformer", "DPMSolverMultistepScheduler", PIXART_ARGS, 64),
    "sd3": ("transformer", "FlowMatchEulerDiscreteScheduler", {}, 64),
    "flux": ("transformer", "FlowMatchEulerDiscreteScheduler", {}, 256),
    "sana": ("transformer", "DPMSolverMultistepScheduler", PIXART_ARGS, 64),  # its own, flow sigmas
}


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {family: make_tiny_pipeline(root / family, family=family) for family in FAMILIES}


def batch(positions: list[int]) -> dict:
    captions = ["a red cube", "two small blue balls beside a large green ring", "a ring"]  # lengths differ
    return {"caption_id": np.array(positions), "position": np.array(positions),
            "caption": np.array([captions[p % 3] for p in positions])}


def render_with_denoiser_inputs(generator, positions: list[int]) -> tuple[np.ndarray, dict]:
    """The images of one call and the tensors its denoiser got at the first step (dicts flattened)."""
    inputs = {}

    def capture(_module, _args, kwargs):
        if not inputs:
            for key, value in kwargs.items():
                for name, tensor in (value.items() if isinstance(value, dict) else [(key, value)]):
                    if isinstance(tensor, torch.Tensor):
                        inputs[name] = tensor.clone()

    hook = denoiser(generator.pipe)[1].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        return generator(batch(positions))["images"], inputs
    finally:
        hook.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_family_loads_and_renders_seeded_images(pipelines, family, caplog, capsys):
    n = 2
    config = GeneratorConfig(model=str(pipelines[family]), steps=2, output_size=16, images_per_caption=n)
    DiffusersGenerator.preflight(config)
    with caplog.at_level(logging.WARNING, logger="stablerep_ray.generation.diffusion"):
        generator = DiffusersGenerator(config)
    printed = capsys.readouterr()
    assert "it/s" not in printed.err + printed.out, "no loading progress bars: one line per actor"
    assert f"generator: {config.model} ({type(generator.pipe).__name__}) ready on cpu, float32" in printed.out
    denoiser_name, scheduler, fixed, native = EXPECTED[family]
    assert getattr(generator.pipe, denoiser_name) is not None
    assert type(generator.pipe.scheduler).__name__ == scheduler
    assert generator.call_args == call_args(generator.pipe) == fixed
    # the resolution left at its default became the model's native one, logged
    assert generator.cfg.resolution == native and f"resolution 512 -> {native}" in caplog.text

    images, inputs = render_with_denoiser_inputs(generator, [5, 6, 9])  # 6, 9: one caption, two positions
    assert images.shape == (3, n, 16, 16, 3) and images.dtype == np.uint8
    assert not np.array_equal(images[0, 0], images[0, 1]), "different indices, different images"
    assert not np.array_equal(images[1], images[2]), "a repeated caption gets new images"
    alone, alone_inputs = render_with_denoiser_inputs(generator, [6])
    assert np.abs(alone[0].astype(int) - images[1].astype(int)).max() <= 2, "an image depends on its position only"
    # ... and so does everything its denoiser is given: text states, attention masks, pooled and time
    # embeddings, latents (rows: [unconditional..., conditional...] with guidance, caption-major each)
    assert inputs.keys() == alone_inputs.keys()
    for name, together in inputs.items():
        own = alone_inputs[name]
        if together.shape == own.shape:  # not per image (Flux's position ids)
            assert torch.equal(together, own), name
            continue
        copies = own.shape[0] // n
        rows = together.reshape(copies, 3, n, *together.shape[1:])[:, 1]
        torch.testing.assert_close(rows, own.reshape(copies, n, *own.shape[1:]), msg=name)


def test_long_captions_are_cut_with_one_notice_per_actor(pipelines, caplog, capfd):
    """diffusers warns on every call that truncates, quoting the cut text once per image."""
    generator = DiffusersGenerator(GeneratorConfig(model=str(pipelines["sd15"]), steps=1, resolution=64,
                                                   output_size=16, images_per_caption=2))
    long = {"caption_id": np.array([0, 1]), "position": np.array([0, 1]), "caption": np.array(["a red cube " * 20] * 2)}
    with caplog.at_level(logging.WARNING, logger="stablerep_ray.generation.diffusion"):
        for _ in range(2):
            assert generator(long)["images"].shape == (2, 2, 16, 16, 3)
    notices = [r.getMessage() for r in caplog.records if "cuts captions" in r.getMessage()]
    assert notices == [f"generator: {pipelines['sd15']} cuts captions longer than its text encoders take "
                       f"(77 tokens for a CLIP encoder); said once per actor"]
    printed = capfd.readouterr()
    assert "truncated" not in printed.err + printed.out and "sequence length" not in printed.err + printed.out


def test_flow_matching_pipeline_refuses_a_ddpm_sampler_when_loaded(pipelines):
    """A hub id cannot be checked before Ray starts: the actor refuses with the same one line."""
    with pytest.raises(ConfigError, match=r"generator\.scheduler: StableDiffusion3Pipeline samples with "
                                          r"FlowMatchEulerDiscreteScheduler.*set generator.scheduler=pipeline"):
        DiffusersGenerator(GeneratorConfig(model=str(pipelines["sd3"]), scheduler="euler", resolution=64))


def test_tokenizer_source_is_the_first_clip_tokenizer(pipelines):
    for family in ("sd15", "sdxl", "sd3", "flux"):
        assert DiffusersGenerator.tokenizer_source(GeneratorConfig(model=str(pipelines[family]))) == (
            str(pipelines[family]), "tokenizer")
    for family, tokenizer in (("pixart", "T5Tokenizer"), ("sana", "GemmaTokenizer")):
        with pytest.raises(ConfigError, match=rf"model\.text\.tokenizer: .* has no CLIP tokenizer .*{tokenizer}"):
            DiffusersGenerator.tokenizer_source(GeneratorConfig(model=str(pipelines[family])))
