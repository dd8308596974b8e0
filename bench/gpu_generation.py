"""bench.gpu's generator side: real-size, random-weight text-to-image pipelines on one GPU.

Each family is its diffusers pipeline class built from the real architecture's configs with random
weights (no download): SD 1.5 (UNet, 860 M parameters) and PixArt-alpha 512 px (DiT-XL/2 transformer,
28 blocks, 1152 wide, cross-attention to T5-XXL states), both with SD's VAE. The text encoders are
left out: prompts are random embeddings of the encoder's output shape (one encoder forward per
caption, shared by its n images: well under 1 % of an image's FLOPs). A call is what a generator
actor runs: the pipeline's ``__call__`` (classifier-free guidance, DPM-Solver++, VAE decode, output
as tensors) with ``diffusion.call_args`` and the product's speed options (``apply_speed_options``),
then the actor's resize to the stored 256 px (``to_stored_uint8``).

FLOPs per image are counted, not modelled: ``torch.utils.flop_counter`` on one call at 2 and at 3
steps gives the cost of a guided step and of the decode, so F(S) = S x step + decode for any family.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu",
    flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, mid_block_scale_factor=1,
)  # fmt: skip
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), act_fn="silu", sample_size=512, scaling_factor=0.18215,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)  # fmt: skip
# PixArt-XL-2-512x512: the class defaults are DiT-XL/2 (28 blocks, 16 heads x 72, patch 2, learned
# variance); the 512 px model has a 64 latent and takes T5-XXL's 4096-wide states.
PIXART_512 = dict(sample_size=64, caption_channels=4096)
# --smoke-cpu: the same code on toy shapes (64 px)
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
)  # fmt: skip
TINY_PIXART = dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, cross_attention_dim=32,
                   caption_channels=32, sample_size=8)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=32,
    block_out_channels=(32, 64), sample_size=64, scaling_factor=0.18215,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
)  # fmt: skip
SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


@dataclass(frozen=True)
class Family:
    label: str
    pipeline: str  # diffusers pipeline class
    denoiser: tuple[str, str]  # (pipeline attribute, diffusers model class)
    real: dict  # denoiser config at real size
    tiny: dict  # and for --smoke-cpu
    text: tuple[int, int]  # prompt embedding (tokens, width) at real size
    schedule: dict = field(default_factory=dict)  # DPM-Solver++ noise schedule
    attention_mask: bool = False  # the pipeline takes T5 attention masks with its embeddings


FAMILIES = {
    "sd15": Family("SD-1.5", "StableDiffusionPipeline", ("unet", "UNet2DConditionModel"), SD15_UNET, TINY_UNET,
                   (77, 768), SD_SCHEDULE),
    "pixart": Family("PixArt-alpha", "PixArtAlphaPipeline", ("transformer", "PixArtTransformer2DModel"),
                     PIXART_512, TINY_PIXART, (120, 4096), attention_mask=True),
}
NO_TEXT_ENCODERS = {"StableDiffusionPipeline": dict(text_encoder=None, tokenizer=None, safety_checker=None,
                                                    feature_extractor=None, requires_safety_checker=False),
                    "PixArtAlphaPipeline": dict(text_encoder=None, tokenizer=None)}


def build(family: Family, device, options, smoke: bool, compile_mode: str):
    """The family's pipeline on ``device`` in ``options.dtype``, with ``options``' speed settings applied
    exactly as a generator actor applies them."""
    import diffusers
    import torch

    from stablerep_ray.generation.diffusion import apply_speed_options
    from stablerep_ray.precision import resolve_dtype

    diffusers.utils.logging.set_verbosity_error()  # not the note, on every cast, that no module stays fp32
    torch.manual_seed(0)
    name, cls = family.denoiser
    with torch.device(device):  # random init on the GPU: seconds, not minutes, at real size
        denoiser = getattr(diffusers, cls)(**(family.tiny if smoke else family.real))
        vae = diffusers.AutoencoderKL(**(TINY_VAE if smoke else SD15_VAE))
    scheduler = diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", **family.schedule)
    pipe = getattr(diffusers, family.pipeline)(**{name: denoiser}, vae=vae, scheduler=scheduler,
                                               **NO_TEXT_ENCODERS[family.pipeline])
    pipe = pipe.to(device, resolve_dtype(options.dtype, device))
    pipe.set_progress_bar_config(disable=True)
    apply_speed_options(pipe, options, device, compile_mode=compile_mode)
    return pipe


def generate_fn(pipe, family: Family, *, batch: int, steps: int, resolution: int, device, smoke: bool,
                guidance: float = 2.0, stored: int = 256):
    """One generator call of ``batch`` images (one per prompt), as the actor makes it."""
    import torch

    from stablerep_ray.generation.diffusion import call_args, to_stored_uint8

    tokens, width = (16, 32) if smoke else family.text  # both tiny denoisers take 32-wide states
    dtype = pipe.vae.dtype
    embeds = {"prompt_embeds": torch.randn(batch, tokens, width, device=device, dtype=dtype),
              "negative_prompt_embeds": torch.randn(batch, tokens, width, device=device, dtype=dtype)}
    if family.attention_mask:
        ones = torch.ones(batch, tokens, device=device, dtype=torch.long)
        embeds.update(prompt_attention_mask=ones, negative_prompt_attention_mask=ones)
    generators = [torch.Generator(device).manual_seed(i) for i in range(batch)]
    fixed = call_args(pipe)

    def run():
        with torch.inference_mode():
            out = pipe(num_inference_steps=steps, guidance_scale=guidance, height=resolution, width=resolution,
                       negative_prompt=None, generator=generators, output_type="pt", **embeds, **fixed)
            return to_stored_uint8(out.images, min(stored, resolution))

    return run


def count_tflop(pipe, family: Family, resolution: int, device, smoke: bool) -> dict:
    """Counted TFLOP of one guided denoising step and of one VAE decode, per image (batch 1)."""
    from torch.utils.flop_counter import FlopCounterMode

    totals = []
    for steps in (2, 3):  # PixArt's one-step call expects a one-step (LCM/DMD) scheduler
        fn = generate_fn(pipe, family, batch=1, steps=steps, resolution=resolution, device=device, smoke=smoke)
        with FlopCounterMode(display=False) as counter:
            fn()
        totals.append(counter.get_total_flops() / 1e12)
    step = totals[1] - totals[0]
    return {"tflop_per_step": step, "tflop_decode": totals[0] - 2 * step}


def tflop_per_image(flops: dict, steps: int) -> float:
    return steps * flops["tflop_per_step"] + flops["tflop_decode"]


class Budget:
    """Wall-clock budget of a whole run: measurements past it are skipped, not started."""

    def __init__(self, seconds: float | None):
        self.seconds, self.start = seconds, time.perf_counter()

    def spent(self) -> bool:
        return self.seconds is not None and time.perf_counter() - self.start > self.seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start
