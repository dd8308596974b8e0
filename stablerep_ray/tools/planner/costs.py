"""The cost model and the rates that need no measurement here: FLOP counts, GPU peaks, the estimate
and the GPU benchmark's table.

Kept apart from measuring (``measure``) and from the split (``split``) because it is pure arithmetic
on published FLOP counts and a JSON table: ``bench.gpu`` imports its constants without pulling in
torch models or the training step, and the numbers can be checked against the cost-model reference
on their own.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ...config import Config, GeneratorConfig

# -- the cost model (see the cost-model reference: FLOPs counted on the diffusers configs) -------
UNET_TFLOP_512 = 0.805  # one SD-1.5/2.1 UNet forward, one sample, 64x64 latent (2 per step with CFG)
VAE_DECODE_TFLOP_512 = 2.5  # VAE decode 64x64 latent -> 512 px
VIT_B16_TRAIN_TFLOP = 0.105  # ViT-B/16, one 224 px view, forward + backward
VIT_B16_PARAMS = 85.8e6  # encoder parameters of vit_base_patch16_224 (num_classes=0)
VIT_B16_TOKENS = 197
# Dense bf16 peak by GPU type; a device name is matched with its spaces read as dashes, the more specific
# type first ("NVIDIA H100 PCIe" is an H100-PCIE, not an H100 SXM).
PEAK_BF16_TFLOPS = {"H100-NVL": 835.0, "H100-PCIE": 756.0, "H100": 990.0, "H200": 990.0, "A100": 312.0,
                    "L40S": 362.0, "L40": 181.0, "L4": 121.0}
ASSUMED_UTILISATION = 0.40  # fraction of bf16 peak assumed for BOTH sides in the estimate
SD_UNET_CHANNELS = [320, 640, 1280, 1280]
SD_HUB_IDS = re.compile(r"stable-diffusion-(v1|2)|stable-diffusion-v-?1|sd-?1\.?5|sd-?2", re.I)


def generation_tflop(steps: int, resolution: int = 512, guidance: bool = True) -> float:
    """F(S): TFLOP per SD image; two UNet passes per step with classifier-free guidance.

    Scaled with the latent area away from 512 px (attention makes the true cost a little steeper).
    """
    unet = UNET_TFLOP_512 * (2 if guidance else 1)
    return (unet * steps + VAE_DECODE_TFLOP_512) * (resolution / 512) ** 2


def generators_per_trainer(gen_rate: float, train_rate: float, images_per_caption: int,
                           group_size: int, reuse: int) -> float:
    """k: generator devices one trainer device needs (rates in images/s per device)."""
    return train_rate * images_per_caption / (gen_rate * group_size * reuse)


def cost_model_ratio(steps: int, reuse: int, images_per_caption: int = 1, group_size: int = 1,
                     resolution: int = 512, guidance: bool = True,
                     train_tflop: float = VIT_B16_TRAIN_TFLOP) -> float:
    """k at equal utilisation on both sides: F(S) * n / (0.105 * m * R)."""
    return generators_per_trainer(1 / generation_tflop(steps, resolution, guidance), 1 / train_tflop,
                                  images_per_caption, group_size, reuse)


# -- rates -------------------------------------------------------------------------------------
@dataclass
class Rates:
    """images/s per device: one GPU (GPU configs) or one actor / one worker (CPU configs)."""

    generator: float
    trainer: float
    generator_source: str
    trainer_source: str
    estimate: bool = False
    notes: list[str] = field(default_factory=list)


def results_dir() -> Path:
    """bench/results of this checkout (or $STABLEREP_BENCH_RESULTS)."""
    if os.environ.get("STABLEREP_BENCH_RESULTS"):
        return Path(os.environ["STABLEREP_BENCH_RESULTS"])
    here = Path.cwd() / "bench" / "results"
    return here if here.is_dir() else Path(__file__).resolve().parents[3] / "bench" / "results"


def uses_gpus(config: Config) -> tuple[bool, bool]:
    """(trainers on GPUs, generators on GPUs)."""
    return config.train.use_gpu, config.generator.num_gpus_per_actor > 0


def guidance_on(gen: GeneratorConfig) -> bool:
    return gen.guidance_scale > 1  # diffusers runs the unconditional pass only for w > 1


def is_sd_family(gen: GeneratorConfig) -> bool:
    """An SD-1.x/2.x-architecture UNet (the cost model's FLOP counts apply)."""
    if gen.backend != "diffusers":
        return False
    unet_config = Path(gen.model).expanduser() / "unet" / "config.json"
    if unet_config.is_file():
        cfg = json.loads(unet_config.read_text())
        return list(cfg.get("block_out_channels", [])) == SD_UNET_CHANNELS and cfg.get(
            "cross_attention_dim") in (768, 1024)
    return bool(SD_HUB_IDS.search(gen.model))


def trainer_tflop(config: Config) -> float | None:
    """Training TFLOP per encoder input for timm ViTs with patch stems; None for others (measured instead).

    0.105 for one forward + backward of ViT-B/16 at 224 px (the cost model); other ViTs scale it by
    encoder parameters x tokens (the 6 * params * tokens rule, which gives 0.10 for ViT-B/16); the
    objective's ``relative_cost`` adds what it runs beyond that (SynCLR: teacher and local crops).
    """
    from ...training.objectives import get_objective

    m = config.model
    factor = get_objective(config.train.objective).relative_cost(config)
    if m.name == "vit_base_patch16_224" and m.image_size == 224 and not m.kwargs:
        return VIT_B16_TRAIN_TFLOP * factor
    if not m.name.startswith(("vit_", "deit_")) or m.stem != "patch":  # no token-count rule: measure
        return None
    import torch

    from ...models import create_encoder

    with torch.device("meta"):
        encoder = create_encoder(m)
    params = sum(p.numel() for p in encoder.parameters())
    patch = encoder.patch_embed.patch_size[0]
    tokens = (m.image_size // patch) ** 2 + getattr(encoder, "num_prefix_tokens", 1)
    return VIT_B16_TRAIN_TFLOP * params / VIT_B16_PARAMS * tokens / VIT_B16_TOKENS * factor


def detect_gpu_type(default: str = "H100") -> tuple[str, str]:
    """(table key, how it was chosen): from torch.cuda.get_device_name() when a GPU is visible."""
    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            if key := gpu_type_of(name):
                return key, f"detected {name}"
            return default, f"{name} is not in the peak table, {default} assumed"
    except Exception:  # noqa: BLE001 - no torch / driver: fall back to the default
        pass
    return default, f"{default} assumed: no GPU visible here"


def estimate_rates(config: Config, gpu_type: str | None = None) -> Rates | None:
    """Rates per GPU from the cost model at ASSUMED_UTILISATION of bf16 peak; None if it cannot apply."""
    gen = config.generator
    train_tf = trainer_tflop(config)
    if not is_sd_family(gen) or train_tf is None:
        return None
    key, how = (gpu_type.upper(), "given") if gpu_type else detect_gpu_type()
    if key not in PEAK_BF16_TFLOPS:
        raise ValueError(f"gpu_type {gpu_type!r}: known types are {', '.join(PEAK_BF16_TFLOPS)}")
    peak = PEAK_BF16_TFLOPS[key]
    f = generation_tflop(gen.steps, gen.resolution, guidance_on(gen))
    sustained = ASSUMED_UTILISATION * peak
    label = (f"ESTIMATE (not measured): cost-model FLOPs at an assumed {ASSUMED_UTILISATION:.0%} of "
             f"{key} bf16 peak {peak:g} TFLOP/s; {how}")
    return Rates(
        generator=sustained / f,
        trainer=sustained / train_tf,
        generator_source=f"{label}; F({gen.steps}) = {f:.1f} TFLOP per {gen.resolution} px image"
        + (" with CFG" if guidance_on(gen) else " without CFG"),
        trainer_source=f"{label}; {train_tf:.3f} TFLOP per {config.model.image_size} px view (fwd+bwd)",
        estimate=True,
    )


def table_rates(config: Config, results: Path | None = None) -> Rates | None:
    """Rates per GPU from bench/results/gpu.json (bench.gpu on a GPU), where they apply."""
    path = (results or results_dir()) / "gpu.json"
    if not path.is_file():
        return None
    table = json.loads(path.read_text())
    if table.get("skipped"):
        return None
    gen, device = config.generator, table.get("device", "?")
    gen_rate = gen_source = train_rate = train_source = None
    sd_rows = [r for r in table.get("sd15", []) if r.get("images_per_s")]
    if is_sd_family(gen) and sd_rows:
        rows = [r for r in sd_rows if r["steps"] == gen.steps] or sd_rows
        best = max(rows, key=lambda r: r["images_per_s"])
        # rescale to this config's steps / resolution / guidance with the FLOP model
        f_bench = generation_tflop(best["steps"], best.get("resolution", 512), best.get("guidance", True))
        f_here = generation_tflop(gen.steps, gen.resolution, guidance_on(gen))
        gen_rate = best["images_per_s"] * f_bench / f_here
        scaled = "" if f_bench == f_here else f", rescaled from {best['steps']} steps by the FLOP model"
        gen_source = (f"measured by bench.gpu on {device}: SD-1.5 UNet+VAE, batch {best['batch']}, "
                      f"compile={best.get('compile', False)}{scaled} ({path})")
    vit_rows = [r for r in table.get("vit_b16", []) if r.get("images_per_s")]
    train_tf = trainer_tflop(config)
    if vit_rows and train_tf is not None:
        best = max(vit_rows, key=lambda r: r["images_per_s"])
        train_rate = best["images_per_s"] * VIT_B16_TRAIN_TFLOP / train_tf
        train_source = (f"measured by bench.gpu on {device}: ViT-B/16 train step, batch {best['batch']}"
                        + ("" if train_tf == VIT_B16_TRAIN_TFLOP else ", rescaled by FLOPs") + f" ({path})")
    if gen_rate is None and train_rate is None:
        return None
    estimate = estimate_rates(config, gpu_type_of(device))
    if (gen_rate is None or train_rate is None) and estimate is None:
        return None
    return Rates(
        generator=gen_rate if gen_rate is not None else estimate.generator,
        trainer=train_rate if train_rate is not None else estimate.trainer,
        generator_source=gen_source or estimate.generator_source,
        trainer_source=train_source or estimate.trainer_source,
        estimate=gen_rate is None or train_rate is None,
    )


def gpu_type_of(device_name: str) -> str | None:
    """The PEAK_BF16_TFLOPS key of a ``torch.cuda.get_device_name()``, None for a card not in the table."""
    name = str(device_name).upper().replace(" ", "-")
    return next((key for key in PEAK_BF16_TFLOPS if key in name), None)

