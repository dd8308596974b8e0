"""The diffusers backend: any Stable Diffusion text-to-image pipeline loaded with ``from_pretrained``.

Each actor loads its pipeline once and renders ``captions_per_call x n`` images per call. Image j of
the row at source position p is drawn from its own torch.Generator seeded with ``image_seed(base, p, j)``,
so the same configuration regenerates the same images whatever actor, block or batch a row lands in.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError, GeneratorConfig
from ..precision import resolve_dtype
from .backends import image_seed

logger = logging.getLogger(__name__)

SCHEDULERS = {
    "dpm_solver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
}


def check_pipeline_path(model: str) -> None:
    """Fail fast on a local model path that is missing or is not a diffusers text-to-image pipeline."""
    path = Path(model).expanduser()
    looks_local = path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1
    if not looks_local:
        return  # a hub id: checked when the actor loads it
    index = path / "model_index.json"
    if not path.is_dir():
        raise ConfigError(
            f"generator.model: {model} does not exist; give a diffusers pipeline directory or hub id "
            f"(or build one offline with `stablerep-ray make-tiny-pipeline {model}`)"
        )
    if not index.is_file():
        raise ConfigError(
            f"generator.model: {model} has no model_index.json, so it is not a diffusers pipeline "
            f"directory; point it at a pipeline saved with save_pretrained"
        )
    components = _model_index(index)
    missing = [c for c in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if c not in components]
    if missing or "Img2Img" in components.get("_class_name", "") or "Inpaint" in components.get(
        "_class_name", ""
    ):
        raise ConfigError(
            f"generator.model: {model} holds a {components.get('_class_name')} without "
            f"{', '.join(missing) or 'a text-to-image entry point'}; a Stable Diffusion text-to-image "
            f"pipeline is needed"
        )
    absent = [c for c, v in components.items() if _is_component(c, v) and not (path / c).is_dir()]
    if absent:
        raise ConfigError(
            f"generator.model: {model} lists {', '.join(absent)} in model_index.json but has no "
            f"{'/, '.join(absent)}/ folder; the download or copy is incomplete, fetch the whole pipeline"
        )


def _model_index(index: Path) -> dict:
    """The parsed model_index.json of a local pipeline (a JSON object), or a ConfigError."""
    try:
        components = json.loads(index.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise ConfigError(
            f"generator.model: {index} is not valid JSON ({err}); the download or copy is incomplete, "
            f"fetch the pipeline again"
        ) from None
    if not isinstance(components, dict):
        raise ConfigError(f"generator.model: {index} is not a JSON object; fetch the pipeline again")
    return components


def _is_component(name: str, value) -> bool:
    """A model_index.json entry that save_pretrained wrote to its own subfolder (not a null slot)."""
    return not name.startswith("_") and isinstance(value, list) and any(v is not None for v in value)


def load_pipeline(cfg: GeneratorConfig):
    """``from_pretrained`` + scheduler swap + the speed options that apply to this device."""
    import diffusers
    from diffusers import DiffusionPipeline

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(cfg.dtype, device)
    pipe = DiffusionPipeline.from_pretrained(cfg.model, torch_dtype=dtype)
    if cfg.scheduler != "pipeline":
        cls_name, extra = SCHEDULERS[cfg.scheduler]
        pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **extra)
    if not cfg.safety_checker and getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    if cfg.safety_checker and getattr(pipe, "safety_checker", None) is None:
        raise ConfigError(
            f"generator.safety_checker: {cfg.model} has no safety checker; set it to false or use a "
            f"pipeline that ships one"
        )
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if device.type == "cuda":
        if cfg.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        if cfg.compile:
            pipe.unet = torch.compile(pipe.unet, mode="max-autotune-no-cudagraphs", fullgraph=True)
    if cfg.vae_slicing:
        pipe.vae.enable_slicing()
    return pipe, device


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
        check_pipeline_path(config.model)

    @staticmethod
    def tokenizer_source(config: GeneratorConfig) -> tuple[str, str | None]:
        """Where StableRep+ finds this backend's tokenizer: the pipeline's ``tokenizer/``."""
        return config.model, "tokenizer"

    def __init__(self, config: GeneratorConfig):
        self.cfg = config
        self.pipe, self.device = load_pipeline(config)
        self.dropped = 0  # images flagged by the safety checker

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cfg = self.cfg
        n = cfg.images_per_caption
        captions = [str(c) for c in batch["caption"]]
        generators = [
            torch.Generator(self.device).manual_seed(image_seed(cfg.seed, int(position), j))
            for position in batch["position"]
            for j in range(n)
        ]
        with torch.inference_mode():
            out = self.pipe(
                prompt=captions,
                num_images_per_prompt=n,
                generator=generators,
                num_inference_steps=cfg.steps,
                guidance_scale=cfg.guidance_scale,
                height=cfg.resolution,
                width=cfg.resolution,
                output_type="pt",
            )
        # (B*n, 3, H, W) float in [0, 1], caption-major (diffusers repeats each prompt n times).
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
