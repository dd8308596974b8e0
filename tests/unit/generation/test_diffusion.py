"""The diffusers backend on every tiny pipeline family, in-process on CPU: from_pretrained of a saved
directory, the model's own settings, seeded images, the StableRep+ tokenizer source."""

import logging

import numpy as np
import pytest
import torch

from stablerep_ray.config import ConfigError, GeneratorConfig
from stablerep_ray.generation.diffusion import DiffusersGenerator, call_args, denoiser, native_resolution
from stablerep_ray.tools.tiny_pipeline import FAMILIES, make_tiny_pipeline

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
# (denoiser, scheduler the actor runs with the config's default sampler, call arguments it fixes,
# native resolution: 2 x the tiny sample size; Flux's, FLUX.2's and Qwen-Image's pipelines fix the latent
# size at 128; Z-Image's fixes 1024 px)
PIXART_ARGS = {"use_resolution_binning": False, "clean_caption": False}
EXPECTED = {
    "sd15": ("unet", "DPMSolverMultistepScheduler", {}, 64),
    "sdxl": ("unet", "DPMSolverMultistepScheduler", {}, 64),
    "pixart": ("transformer", "DPMSolverMultistepScheduler", PIXART_ARGS, 64),
    "sd3": ("transformer", "FlowMatchEulerDiscreteScheduler", {}, 64),
    "flux": ("transformer", "FlowMatchEulerDiscreteScheduler", {}, 256),
    "sana": ("transformer", "DPMSolverMultistepScheduler", PIXART_ARGS, 64),  # its own, flow sigmas
    "qwenimage": ("transformer", "FlowMatchEulerDiscreteScheduler", {}, 256),
    "zimage": ("transformer", "FlowMatchEulerDiscreteScheduler", {}, 1024),  # fixed in its __call__
    "flux2klein": ("transformer", "FlowMatchEulerDiscreteScheduler", {}, 256),
}
RENDERED_AT = {"zimage": 64}  # families whose native size is too slow for a CPU test: set in the config


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {family: make_tiny_pipeline(root / family, family=family) for family in FAMILIES}


def batch(positions: list[int]) -> dict:
    captions = ["a red cube", "two small blue balls beside a large green ring", "a ring"]  # lengths differ
    return {"caption_id": np.array(positions), "position": np.array(positions),
            "caption": np.array([captions[p % 3] for p in positions])}


def render_with_denoiser_inputs(generator, positions: list[int]) -> tuple[np.ndarray, dict]:
    """The images of one call and what its denoiser got at the first step: tensors, and lists of
    per-image tensors (Z-Image), by keyword or position (dicts flattened)."""
    images, calls = denoiser_calls(generator, positions)
    args, kwargs = calls[0]
    inputs = {}
    for key, value in [(f"arg{i}", value) for i, value in enumerate(args)] + list(kwargs.items()):
        for name, item in (value.items() if isinstance(value, dict) else [(key, value)]):
            if isinstance(item, torch.Tensor) or (
                    isinstance(item, list) and item and all(isinstance(x, torch.Tensor) for x in item)):
                inputs[name] = item
    return images, inputs


def denoiser_calls(generator, positions: list[int]) -> tuple[np.ndarray, list[tuple[tuple, dict]]]:
    """The images of one batch and the (args, kwargs) of every denoiser call that rendered it, tensors
    copied as they were passed."""
    calls = []

    def copied(value):
        if isinstance(value, torch.Tensor):
            return value.clone()
        if isinstance(value, (list, tuple)):
            return type(value)(copied(v) for v in value)
        return {k: copied(v) for k, v in value.items()} if isinstance(value, dict) else value

    hook = denoiser(generator.pipe)[1].register_forward_pre_hook(
        lambda _module, args, kwargs: calls.append((copied(args), copied(kwargs))), with_kwargs=True)
    try:
        return generator(batch(positions))["images"], calls
    finally:
        hook.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_family_loads_and_renders_seeded_images(pipelines, family, caplog, capsys):
    n, denoiser_name, scheduler, fixed, native = 2, *EXPECTED[family]
    config = GeneratorConfig(model=str(pipelines[family]), steps=2, output_size=16, images_per_caption=n,
                             resolution=RENDERED_AT.get(family, GeneratorConfig().resolution))
    DiffusersGenerator.preflight(config)
    with caplog.at_level(logging.WARNING, logger="stablerep_ray.generation.diffusion"):
        generator = DiffusersGenerator(config)
    printed = capsys.readouterr()
    assert "it/s" not in printed.err + printed.out, "no loading progress bars: one line per actor"
    assert f"generator: {config.model} ({type(generator.pipe).__name__}) ready on cpu, float32" in printed.out
    assert getattr(generator.pipe, denoiser_name) is not None
    assert type(generator.pipe.scheduler).__name__ == scheduler
    assert generator.call_args == call_args(generator.pipe) == fixed
    assert native_resolution(generator.pipe) == native
    if family not in RENDERED_AT:  # the resolution left at its default became the native one, logged
        assert generator.cfg.resolution == native and f"resolution 512 -> {native}" in caplog.text

    images, inputs = render_with_denoiser_inputs(generator, [5, 6, 9])  # 6, 9: one caption, two positions
    assert images.shape == (3, n, 16, 16, 3) and images.dtype == np.uint8
    assert not np.array_equal(images[0, 0], images[0, 1]), "different indices, different images"
    assert not np.array_equal(images[1], images[2]), "a repeated caption gets new images"
    alone, alone_inputs = render_with_denoiser_inputs(generator, [6])
    assert np.abs(alone[0].astype(int) - images[1].astype(int)).max() <= 2, "an image depends on its position only"
    # ... and so does everything its denoiser is given: text states, attention masks, pooled and time
    # embeddings, latents (rows: [unconditional..., conditional...] with guidance, caption-major each)
    assert_same_conditioning(inputs, alone_inputs, captions=3, caption=1, n=n)


def assert_same_conditioning(together: dict, alone: dict, captions: int, caption: int, n: int) -> None:
    """The denoiser inputs of ``caption``'s images in a call of ``captions`` captions equal those of a
    call of that caption alone. Rows are [unconditional..., conditional...] under guidance, caption-major
    in each. Qwen-Image pads text states to the call's longest caption and passes a mask only when
    lengths differ: padding must be zeros, and masked out."""
    for name in together.keys() - alone.keys():
        assert "mask" in name, f"{name}: only in the call of several captions"
        length = alone["encoder_hidden_states"].shape[1]
        mask = together[name].reshape(-1, captions, n, *together[name].shape[1:])[:, caption]
        assert mask[..., :length].all() and not mask[..., length:].any(), name
    assert alone.keys() <= together.keys()
    for name, own in alone.items():
        if isinstance(own, torch.Tensor) and together[name].shape == own.shape:  # not per image: position ids
            assert torch.equal(together[name], own), name
            continue
        for copy in range(len(own) // n):
            for j in range(n):
                row, own_row = together[name][(copy * captions + caption) * n + j], own[copy * n + j]
                if row.shape != own_row.shape:  # padded to the call's longest caption
                    region = tuple(slice(0, size) for size in own_row.shape)
                    padding = row.clone()
                    padding[region] = 0
                    assert not padding.any(), f"{name}: padding is not zeros"
                    row = row[region]
                torch.testing.assert_close(row, own_row, msg=name)


@pytest.mark.parametrize(("family", "parameter"), [("qwenimage", "true_cfg_scale"), ("sd15", "guidance_scale"),
                                                   ("flux", "guidance_scale")])
def test_guidance_scale_reaches_the_pipeline_as_its_guidance(pipelines, family, parameter):
    """Denoiser rows per step for 4 images: 8 under classifier-free guidance (SD batches both branches,
    Qwen-Image runs two passes), 4 without. Qwen-Image guides through true_cfg_scale, on only with a
    negative prompt (its guidance_scale is for guidance-distilled weights, ignored otherwise);
    FLUX.1-dev takes guidance_scale as an embedding, one pass a step."""
    rows, embedded = {}, {}
    for scale in (1.0, 3.0):
        generator = DiffusersGenerator(GeneratorConfig(model=str(pipelines[family]), steps=2, resolution=64,
                                                       output_size=16, images_per_caption=2, guidance_scale=scale))
        assert generator.guidance_parameter == parameter
        _, calls = denoiser_calls(generator, [0, 1])
        rows[scale] = sum((args[0] if args else kwargs["hidden_states"]).shape[0] for args, kwargs in calls) // 2
        embedded[scale] = {float(v) for _, kwargs in calls if kwargs.get("guidance") is not None
                           for v in kwargs["guidance"]}
    assert rows == ({1.0: 4, 3.0: 4} if family == "flux" else {1.0: 4, 3.0: 8})
    assert embedded == ({1.0: {1.0}, 3.0: {3.0}} if family == "flux" else {1.0: set(), 3.0: set()})


def test_step_distilled_flux2_runs_with_its_own_steps_and_no_guidance(pipelines, caplog):
    """FLUX.2 [klein] shares its class with its undistilled base; the released weights say
    ``is_distilled`` in their config, and get the card's 4 steps at guidance 1: one pass a step."""
    config = GeneratorConfig(model=str(pipelines["flux2klein"]), resolution=64, output_size=16, images_per_caption=2)
    with caplog.at_level(logging.WARNING, logger="stablerep_ray.generation.diffusion"):
        generator = DiffusersGenerator(config)
    assert (generator.cfg.steps, generator.cfg.guidance_scale) == (4, 1.0)
    assert f"steps {config.steps} -> 4, guidance_scale {config.guidance_scale} -> 1.0" in caplog.text
    _, calls = denoiser_calls(generator, [0, 1])
    assert [kwargs["hidden_states"].shape[0] for _, kwargs in calls] == [4] * 4


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
    for family, tokenizer in (("pixart", "T5Tokenizer"), ("sana", "GemmaTokenizer"), ("qwenimage", "Qwen2Tokenizer"),
                              ("zimage", "Qwen2Tokenizer"), ("flux2klein", "Qwen2Tokenizer")):
        with pytest.raises(ConfigError, match=rf"model\.text\.tokenizer: .* has no CLIP tokenizer .*{tokenizer}"):
            DiffusersGenerator.tokenizer_source(GeneratorConfig(model=str(pipelines[family])))
