"""The diffusers backend: any diffusers text-to-image pipeline loaded with ``from_pretrained``.

UNet (SD 1.x/2.x, SDXL) and transformer (PixArt, SD3, Sana, Flux, FLUX.2, Qwen-Image, Z-Image) denoisers
with one or several text encoders take the same path. Each actor loads its pipeline once, gives it the
settings its model needs where the config left the schema defaults (``pipelines.model_settings``,
logged), and renders ``captions_per_call x n`` images per call. Image j of a row with image key k (its source
position, mixed with its pass over the source after the first: ``image_keys``) is drawn from its own
torch.Generator seeded with ``image_seed(base, k, j)``, so the same configuration regenerates the same
images whatever actor, block or batch a row lands in.
"""

from __future__ import annotations

import inspect
import logging
import time
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError, GeneratorConfig
from ..hub import PIPELINE, loading
from ..memory import NamesSetting, larger_share, loading_model
from ..precision import resolve_dtype
from ..runtime import quiet_model_loading, say_model_ready
from .backends import image_keys, image_seed
from .pipelines import (
    check_pipeline,
    check_scheduler,
    check_text_to_image,
    choose_guidance,
    is_component,
    model_settings,
    no_safety_checker,
    read_json_object,
)

logger = logging.getLogger(__name__)

SCHEDULERS = {
    "dpm_solver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
}
COMPILE_MODE = "max-autotune-no-cudagraphs"
# Call arguments that make an image depend on the config alone, where a pipeline takes them: exactly
# the requested square size (PixArt/Sana would otherwise generate at the nearest trained aspect bin
# and resize), and captions as written (their caption cleaning depends on optional packages).
FIXED_CALL_ARGS = {"use_resolution_binning": False, "clean_caption": False}


def denoiser(pipe) -> tuple[str, torch.nn.Module]:
    """The pipeline's denoiser and its attribute name: ``unet`` or ``transformer``."""
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if module is not None:
            return name, module
    raise ConfigError(f"generator.model: {type(pipe).__name__} has no unet or transformer denoiser")


# Pipelines that fix their default size inside ``__call__`` (``height = height or 1024``), where
# neither the pipeline nor its denoiser's config shows it.
NATIVE_RESOLUTION_IN_CALL = {"ZImagePipeline": 1024}


def native_resolution(pipe) -> int | None:
    """The pixel size the model was trained at: its latent sample size x the VAE's scale factor."""
    size = getattr(pipe, "default_sample_size", None) or denoiser(pipe)[1].config.get("sample_size")
    scale = getattr(pipe, "vae_scale_factor", None)
    if isinstance(size, int) and isinstance(scale, int):
        return size * scale
    return NATIVE_RESOLUTION_IN_CALL.get(type(pipe).__name__)


def call_args(pipe) -> dict:
    """``FIXED_CALL_ARGS`` that this pipeline's ``__call__`` accepts."""
    accepted = inspect.signature(pipe.__call__).parameters
    return {k: v for k, v in FIXED_CALL_ARGS.items() if k in accepted}


def guidance_parameter(pipe, model: str) -> str:
    """The ``__call__`` argument of this loaded pipeline that takes the guidance scale (``choose_guidance``)."""
    embeds_guidance = bool(denoiser(pipe)[1].config.get("guidance_embeds", False))
    return choose_guidance(model, type(pipe).__name__, inspect.signature(pipe.__call__).parameters, embeds_guidance)


def guidance_args(parameter: str, scale: float, images: int) -> dict:
    """The guidance arguments of one call of ``images`` images: with ``true_cfg_scale`` above 1 an empty
    negative prompt per image, which turns classifier-free guidance on (the other pipelines use the
    empty prompt as their unconditional branch by default)."""
    if parameter == "true_cfg_scale" and scale > 1:
        return {parameter: scale, "negative_prompt": [""] * images}
    return {parameter: scale}


def settle_config(pipe, cfg: GeneratorConfig) -> GeneratorConfig:
    """``cfg`` with the model's own settings where it left schema defaults (logged); refuses a loaded
    pipeline that is not text-to-image or whose scheduler the configured sampler cannot replace."""
    pipeline_class = type(pipe).__name__
    check_text_to_image(cfg.model, pipeline_class, [n for n, c in pipe.components.items() if c is not None])
    scheduler = dict(pipe.scheduler.config)
    defaults = {k: p.default for k, p in inspect.signature(pipe.__call__).parameters.items()}
    changes = model_settings(cfg, pipeline_class, scheduler, native_resolution(pipe), defaults, dict(pipe.config))
    if changes:
        was = ", ".join(f"{k} {getattr(cfg, k)!r} -> {v!r}" for k, v in changes.items())
        logger.warning(
            "generator: %s (%s) runs with its own settings where the config left the defaults: %s "
            "(generator.model_defaults=false keeps the config as written)", cfg.model, pipeline_class, was,
        )
        cfg = cfg.model_copy(update=changes)
    check_scheduler(cfg.scheduler, scheduler, type(pipe.scheduler).__name__, pipeline_class)
    return cfg


# What diffusers and transformers say when a caption is longer than a text encoder takes (CLIP: 77
# tokens): diffusers on every call, quoting the cut text once per image.
TRUNCATION_NOTICES = ("The following part of your input was truncated", "Token indices sequence length is longer")


class TruncationNotice(logging.Filter):
    """Says once per actor that long captions are cut, in place of those per-call warnings."""

    def __init__(self, model: str):
        super().__init__()
        self.model, self.said = model, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(TRUNCATION_NOTICES):
            return True
        if not self.said:
            self.said = True
            logger.warning("generator: %s cuts captions longer than its text encoders take (77 tokens for a CLIP "
                           "encoder); said once per actor", self.model)
        return False


def load_pipeline(cfg: GeneratorConfig):
    """``from_pretrained`` + the model's settings + scheduler swap + the speed options for this device.

    Returns (pipeline, device, the config it runs with)."""
    import diffusers
    from diffusers import DiffusionPipeline

    quiet_model_loading()
    diffusers.utils.logging.disable_progress_bar()  # "Loading pipeline components"
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(cfg.dtype, device)
    with loading(cfg.model, PIPELINE) as local:
        pipe = DiffusionPipeline.from_pretrained(cfg.model, dtype=dtype, local_files_only=local)
    notice = TruncationNotice(cfg.model)
    for name in (type(pipe).__module__, "transformers.tokenization_utils_base"):  # where each is logged
        said_by = logging.getLogger(name)
        for earlier in [f for f in said_by.filters if isinstance(f, TruncationNotice)]:
            said_by.removeFilter(earlier)  # a pipeline loaded before in this process
        said_by.addFilter(notice)
    cfg = settle_config(pipe, cfg)
    if cfg.scheduler != "pipeline":
        cls_name, extra = SCHEDULERS[cfg.scheduler]
        pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **extra)
    if not cfg.safety_checker and getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    if cfg.safety_checker and getattr(pipe, "safety_checker", None) is None:
        raise no_safety_checker(cfg.model)
    pipe.set_progress_bar_config(disable=True)
    with loading_model("generator", cfg.model, cfg.dtype):
        pipe = pipe.to(device)
    apply_speed_options(pipe, cfg, device)
    say_model_ready("generator", cfg.model, pipe, device, dtype, started)
    return pipe, device, cfg


def call_memory(cfg: GeneratorConfig, captions: int):
    """A generator call too large for the card names the call's size and what bounds it (``memory``)."""
    work = (f"one call of {captions} caption{'s' if captions > 1 else ''} x {cfg.images_per_caption} images at "
            f"{cfg.resolution} px")
    key = "generator.captions_per_call" if captions > 1 else "generator.images_per_caption"
    fixes = [f"lower {key}"]
    if not cfg.vae_slicing:
        fixes.append("decode one image at a time (generator.vae_slicing: true)")
    if captions == 1:
        fixes.append(larger_share("generator"))
    return NamesSetting(key, work, *fixes)


def apply_speed_options(pipe, cfg: GeneratorConfig, device: torch.device, compile_mode: str = COMPILE_MODE) -> None:
    """channels_last (a UNet and the VAE: the convolutional parts), torch.compile of the denoiser (GPU
    only), VAE slicing and tiling; ``bench.gpu`` measures each through this same function."""
    name, module = denoiser(pipe)
    if device.type == "cuda":
        if cfg.channels_last:
            for conv_net in ([module] if name == "unet" else []) + [pipe.vae]:
                conv_net.to(memory_format=torch.channels_last)
        if cfg.compile:
            setattr(pipe, name, torch.compile(module, mode=compile_mode, fullgraph=True))
    for option, enable in (("vae_slicing", pipe.vae.enable_slicing), ("vae_tiling", pipe.vae.enable_tiling)):
        if getattr(cfg, option):
            try:
                enable()
            except NotImplementedError:
                raise ConfigError(
                    f"generator.{option}: {type(pipe.vae).__name__} does not support it; set it to false"
                ) from None


def to_stored_uint8(images: torch.Tensor, size: int) -> np.ndarray:
    """(N, 3, H, W) float in [0, 1] -> (N, size, size, 3) uint8 on the host.

    Resized (antialiased bilinear) on the pipeline's device before the copy: on a GPU the host then
    receives ``(size / H)^2`` of the bytes and the actor's CPU does no image work.
    """
    x = images.float()
    if x.shape[-2:] != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


class DiffusersGenerator:
    """Ray Data callable class: a diffusers text-to-image pipeline held by one actor."""

    @staticmethod
    def preflight(config: GeneratorConfig) -> None:
        check_pipeline(config)

    @staticmethod
    def tokenizer_source(config: GeneratorConfig) -> tuple[str, str | None]:
        """Where StableRep+ finds this backend's tokenizer: the pipeline's first CLIP tokenizer
        (``tokenizer/`` unless a local model_index.json lists others: PixArt has only T5's, Sana Gemma's)."""
        index = Path(config.model).expanduser() / "model_index.json"
        tokenizers = {c: v[-1] for c, v in (read_json_object(index) if index.is_file() else {}).items()
                      if c.startswith("tokenizer") and is_component(c, v)}
        if not tokenizers:
            return config.model, "tokenizer"
        clip = [c for c, cls in sorted(tokenizers.items()) if "CLIP" in str(cls)]
        if not clip:
            raise ConfigError(
                f"model.text.tokenizer: empty, and {config.model} has no CLIP tokenizer to take (it has "
                f"{', '.join(map(str, tokenizers.values()))}); set model.text.tokenizer to a CLIP tokenizer "
                f"directory or hub id"
            )
        return config.model, clip[0]

    def __init__(self, config: GeneratorConfig):
        self.pipe, self.device, self.cfg = load_pipeline(config)
        self.call_args = call_args(self.pipe)
        self.guidance_parameter = guidance_parameter(self.pipe, config.model)
        self.dropped = 0  # images flagged by the safety checker

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cfg = self.cfg
        n = cfg.images_per_caption
        captions = [str(c) for c in batch["caption"]]
        generators = [
            torch.Generator(self.device).manual_seed(image_seed(cfg.seed, int(key), j))
            for key in image_keys(batch)
            for j in range(n)
        ]
        # Each caption written n times, not num_images_per_prompt=n: several diffusers pipelines (Sana,
        # Lumina 2, AuraFlow, HunyuanDiT) repeat the text attention mask in another order than the text
        # states, so with several captions per call an image would be masked by another caption's
        # mask. The text encoder's share of the cost is small.
        prompts = [caption for caption in captions for _ in range(n)]
        with torch.inference_mode(), call_memory(cfg, len(captions)):
            out = self.pipe(
                prompt=prompts,
                generator=generators,
                num_inference_steps=cfg.steps,
                height=cfg.resolution,
                width=cfg.resolution,
                output_type="pt",
                **guidance_args(self.guidance_parameter, cfg.guidance_scale, len(prompts)),
                **self.call_args,
            )
        # (B*n, 3, H, W) float in [0, 1], caption-major like the prompts.
        images = to_stored_uint8(out.images, cfg.output_size)
        images = images.reshape(len(captions), n, *images.shape[1:])
        num_images = np.full(len(captions), n, dtype=np.int32)
        flagged = getattr(out, "nsfw_content_detected", None)
        if cfg.safety_checker and flagged is not None:
            images, num_images = self._drop_flagged(images, np.asarray(flagged).reshape(len(captions), n))
        return {**batch, "images": images, "num_images": num_images}

    def _drop_flagged(self, images: np.ndarray, flagged: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Move kept images to the front of each group; the stream never serves the slots after them."""
        kept = np.zeros_like(images)
        counts = np.zeros(len(images), dtype=np.int32)
        for i, flags in enumerate(flagged):
            keep = images[i][~flags]
            kept[i, : len(keep)] = keep
            counts[i] = len(keep)
        if flagged.any():
            self.dropped += int(flagged.sum())
            logger.warning("safety checker dropped %d images (%d so far)", flagged.sum(), self.dropped)
        return kept, counts
