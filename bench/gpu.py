"""GPU throughput of both sides at paper scale: SD-1.5 generation and ViT-B/16 training.

    uv run python -m bench.gpu                          # full sweep (a few minutes on an H100)
    uv run python -m bench.gpu --compile                # + torch.compile'd UNet / ViT (slow warm-up)
    uv run python -m bench.gpu --quick                  # batch 8 / 128 only
    uv run python -m bench.gpu --quick --options        # + each speed option alone vs the default
    uv run python -m bench.gpu --smoke-cpu              # tiny shapes on CPU: checks the code path only

Only meaningful on a GPU: without CUDA it prints a message and exits 0 (nothing written).

Generation: the real SD-1.5 architecture (UNet2DConditionModel and AutoencoderKL with SD-1.5's
configs, random init: no download), 512 px (64x64 latent), classifier-free guidance (both halves in
one UNet batch), DPM-Solver++ at 20 and 50 steps, bf16, SDPA attention (AttnProcessor2_0),
channels_last, optional torch.compile (mode max-autotune-no-cudagraphs, as load_pipeline), optional
VAE slicing, batch-size sweep. The CLIP text encoder is not run (random prompt embeddings: one
forward per prompt, well under 1 % of the FLOPs) and images are not resized: this is the UNet + VAE
ceiling of a generator actor. Fraction of peak = images/s x F(S) / peak, with the cost model's
F(S) = 1.61 S + 2.5 TFLOP per image.

Training: the one training step (``TrainStep``, what the train loop runs) for
configs/paper-vitb16-sd15.yaml: timm ViT-B/16 + 3-layer MLP head, the configured objective (the
multi-positive loss, m = 6), BatchAugment (uint8 256 px -> 224 px crops on the GPU), bf16 autocast,
gradient clipping, AdamW; images/s (encoder inputs) and MFU = images/s x 0.105 TFLOP / peak. A
model-only variant (the same step, its augmentation replaced by a fixed 224 px input) separates the
augmentation cost.

Peak dense bf16 (TFLOP/s), from torch.cuda.get_device_name(): H100 990, H200 990, A100 312
(--peak-tflops for other cards). Results go to bench/results/gpu.json, which `stablerep-ray plan`
uses as its measured rate table.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

from . import common

MODULE = "bench.gpu"
PEAKS = {"H100": 990.0, "H200": 990.0, "A100": 312.0}

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
# --smoke-cpu: the same code on toy shapes (cross_attention_dim 32, 64 px)
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
)  # fmt: skip
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=32,
    block_out_channels=(32, 64), sample_size=64, scaling_factor=0.18215,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
)  # fmt: skip


def peak_for(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((v for k, v in PEAKS.items() if k in name.upper()), None)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup: int, iters: int) -> float:
    """Seconds per call after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / iters


def oom_guard(fn):
    import torch

    try:
        return fn(), None
    except torch.cuda.OutOfMemoryError as err:  # noqa: PERF203
        torch.cuda.empty_cache()
        return None, f"OOM: {str(err).splitlines()[0]}"


# -- generation ----------------------------------------------------------------------------------
def build_sd(device, dtype, smoke: bool, channels_last: bool, compile_unet: bool, vae_slicing: bool):
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(TINY_UNET if smoke else SD15_UNET)).to(device, dtype).eval()
    vae = AutoencoderKL(**(TINY_VAE if smoke else SD15_VAE)).to(device, dtype).eval()
    unet.set_attn_processor(AttnProcessor2_0())  # SDPA (flash / memory-efficient kernels)
    vae.set_attn_processor(AttnProcessor2_0())
    if channels_last:
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    if vae_slicing:
        vae.enable_slicing()
    if compile_unet:
        unet = torch.compile(unet, mode="max-autotune-no-cudagraphs", fullgraph=True)
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, algorithm_type="dpmsolver++",
    )
    return unet, vae, scheduler


def generate_fn(unet, vae, scheduler, batch: int, steps: int, resolution: int, dtype, device,
                channels_last: bool, context_dim: int, guidance: float = 2.0):
    import torch

    latent = resolution // 8
    prompt = torch.randn(2 * batch, 77, context_dim, device=device, dtype=dtype)  # [uncond; cond]

    @torch.inference_mode()
    def run():
        scheduler.set_timesteps(steps, device=device)
        latents = torch.randn(batch, 4, latent, latent, device=device, dtype=dtype) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            uncond, cond = unet(x, t, encoder_hidden_states=prompt, return_dict=False)[0].chunk(2)
            latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents, return_dict=False)[0]
        images = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        return (images.float().clamp(-1, 1) * 127.5 + 127.5).to(torch.uint8)  # as the pipeline's output

    return run


def measure_generation(unet, vae, scheduler, *, batch: int, steps: int, args, device, dtype, peak,
                       channels_last: bool, compiled: bool, vae_slicing: bool) -> dict:
    """One point: images/s of UNet + VAE at this batch and step count, and its fraction of peak."""
    import torch

    from stablerep_ray.tools.planner import generation_tflop

    resolution = 64 if args.smoke_cpu else 512
    context = 32 if args.smoke_cpu else 768
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    fn = generate_fn(unet, vae, scheduler, batch, steps, resolution, dtype, device, channels_last, context)
    seconds, error = oom_guard(lambda: timed(fn, device, warmup=2 if compiled else 1, iters=args.iters))
    row = {"steps": steps, "batch": batch, "resolution": resolution, "guidance": True, "compile": compiled,
           "channels_last": channels_last, "vae_slicing": vae_slicing, "dtype": str(dtype).removeprefix("torch.")}
    if error:
        row["error"] = error
    else:
        f = generation_tflop(steps, resolution)
        row.update(images_per_s=batch / seconds, seconds_per_batch=seconds, image_steps_per_s=batch * steps / seconds,
                   tflops=batch / seconds * f, fraction_of_peak=batch / seconds * f / peak if peak else None)
    if device.type == "cuda":
        row["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    frac = row.get("fraction_of_peak")
    print(f"  SD-1.5 {steps:2d} steps batch {batch:3d} compile={compiled!s:5} {row['dtype']} "
          f"channels_last={channels_last!s:5} vae_slicing={vae_slicing!s:5}: "
          + (row["error"] if error else
             f"{row['images_per_s']:7.2f} images/s, {row['tflops']:6.1f} TFLOP/s"
             + (f" = {frac:.1%} of peak" if frac is not None else "")
             + (f", {row['max_memory_gib']:.1f} GiB" if "max_memory_gib" in row else "")), flush=True)
    return row


def _release(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_generation(args, device, dtype, peak) -> list[dict]:
    rows = []
    channels_last = not args.no_channels_last
    for compiled in ([False, True] if args.compile else [False]):
        unet, vae, scheduler = build_sd(device, dtype, args.smoke_cpu, channels_last, compiled, args.vae_slicing)
        for steps in args.steps:
            for batch in args.gen_batches:
                rows.append(measure_generation(unet, vae, scheduler, batch=batch, steps=steps, args=args,
                                               device=device, dtype=dtype, peak=peak, channels_last=channels_last,
                                               compiled=compiled, vae_slicing=args.vae_slicing))
        del unet, vae
        _release(device)
    return rows


# Each generator speed option alone against the default (bf16, SDPA, channels_last, batched VAE decode).
OPTIONS = [
    ("default", {}),
    ("fp16", {"dtype": "fp16"}),
    ("no channels_last", {"channels_last": False}),
    ("VAE slicing", {"vae_slicing": True}),
    ("torch.compile", {"compiled": True}),
]


def bench_options(args, device, peak) -> list[dict]:
    """One option changed at a time, same steps and batch: what each option is worth on this GPU."""
    import torch

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    rows = []
    for label, change in OPTIONS:
        if change.get("dtype") and args.smoke_cpu:
            continue  # CPU half-precision convolutions say nothing about a GPU
        opts = {"dtype": "fp32" if args.smoke_cpu else "bf16", "channels_last": True, "vae_slicing": False,
                "compiled": False, **change}
        dtype = dtypes[opts["dtype"]]
        unet, vae, scheduler = build_sd(device, dtype, args.smoke_cpu, opts["channels_last"], opts["compiled"],
                                        opts["vae_slicing"])
        row = measure_generation(unet, vae, scheduler, batch=args.options_batch, steps=args.steps[0], args=args,
                                 device=device, dtype=dtype, peak=peak, channels_last=opts["channels_last"],
                                 compiled=opts["compiled"], vae_slicing=opts["vae_slicing"])
        rows.append({"option": label, **row})
        del unet, vae
        _release(device)
    base = rows[0].get("images_per_s")
    for row in rows:
        if base and "images_per_s" in row:
            row["vs_default"] = row["images_per_s"] / base
    return rows


# -- training ------------------------------------------------------------------------------------
def fixed_input(inputs):
    """An ``Augment`` that ignores the batch and returns ``inputs``, a fixed pre-made tensor of the model
    input's shape: the model-only variant's stand-in for augmentation."""
    return lambda images, generator: inputs


def bench_training(args, device, peak) -> list[dict]:
    """The one training step (``TrainStep``, exactly what the train loop runs) at each --train-batches size.

    ``train_step``: a synthetic batch of stored-size uint8 images through the whole step (to the
    device, augmentation, forward and loss under autocast, backward, clipping, AdamW, schedule).
    ``model_only``: the same step with ``step.augment`` replaced by a callable that returns a fixed,
    pre-made tensor of the model input's shape (no augmentation), so the two rows differ by the
    augmentation's cost alone. ``--compile`` sets ``step.forward = torch.compile(step.model)``.
    """
    import torch

    from stablerep_ray.config import load_config
    from stablerep_ray.precision import DTYPES
    from stablerep_ray.tools.planner import VIT_B16_TRAIN_TFLOP
    from stablerep_ray.training.step import TrainStep, synthetic_batch

    overrides = ["model.name=vit_tiny_patch16_224", "model.image_size=32", "model.head_hidden_dim=64",
                 "generator.output_size=48", "train.precision=auto"] if args.smoke_cpu else []
    config = load_config(common.ROOT / "configs" / "paper-vitb16-sd15.yaml", overrides)
    group, size = config.group_size, config.model.image_size
    rows = []
    for compiled in ([False, True] if args.compile else [False]):
        torch.manual_seed(0)
        step = TrainStep.build(config, device)
        if compiled:
            step.forward = torch.compile(step.model)
        dtype = next(k for k, v in DTYPES.items() if v == (step.amp_dtype or torch.float32))
        augment = step.augment
        for batch in args.train_batches:
            data = synthetic_batch(config, batch // group)
            batch = batch // group * group  # encoder inputs per step
            fixed = torch.randn(len(data.images), 3, size, size, device=device)
            for variant, variant_augment in (("train_step", augment), ("model_only", fixed_input(fixed))):
                step.augment = variant_augment
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                run = functools.partial(step, data)
                seconds, error = oom_guard(functools.partial(timed, run, device, 3 if compiled else 2, args.iters * 3))
                row = {"variant": variant, "batch": batch, "compile": compiled, "image_size": size, "dtype": dtype}
                if error:
                    row["error"] = error
                else:
                    row.update(images_per_s=batch / seconds, seconds_per_step=seconds,
                               tflops=batch / seconds * VIT_B16_TRAIN_TFLOP,
                               mfu=batch / seconds * VIT_B16_TRAIN_TFLOP / peak if peak else None)
                if device.type == "cuda":
                    row["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                rows.append(row)
                print(f"  ViT-B/16 {variant:10} batch {batch:4d} compile={compiled!s:5}: "
                      + (row["error"] if error else
                         f"{row['images_per_s']:8.1f} images/s"
                         + (f", MFU {row['mfu']:.1%}" if row.get("mfu") is not None else "")), flush=True)
        step = augment = fixed = run = None  # free before the next variant's model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 50])
    parser.add_argument("--gen-batches", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--train-batches", type=int, nargs="+", default=[66, 132, 258])
    parser.add_argument("--iters", type=int, default=3, help="timed generator batches per point")
    parser.add_argument("--compile", action="store_true", help="also run with torch.compile (minutes of warm-up)")
    parser.add_argument("--vae-slicing", action="store_true", help="decode one image at a time")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--peak-tflops", type=float, help="dense peak of this card if not in the table")
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--quick", action="store_true", help="batch 8 (generation) and 132 (training) only")
    parser.add_argument("--options", action="store_true",
                        help="also each speed option alone vs the default (fp16, channels_last off, VAE slicing, "
                             "torch.compile) at the first --steps and --options-batch")
    parser.add_argument("--options-batch", type=int, default=8)
    parser.add_argument("--smoke-cpu", action="store_true",
                        help="toy shapes on CPU, to check the script (writes gpu-smoke.json, not gpu.json)")
    args = parser.parse_args(argv)

    import torch

    if args.quick:
        args.gen_batches, args.train_batches = [8], [132]
    if args.smoke_cpu:
        device, dtype, name = torch.device("cpu"), torch.float32, "cpu (smoke test: toy shapes)"
        args.steps, args.gen_batches, args.train_batches, args.iters = [2], [1, 2], [12], 1
    elif not torch.cuda.is_available():
        print("bench.gpu: no CUDA device here (torch.cuda.is_available() is False). This benchmark measures "
              "GPU throughput only; run it on a GPU node (`uv run python -m bench.gpu`), or check the script "
              "with --smoke-cpu. Nothing was measured or written.")
        return 0
    else:
        device, dtype = torch.device("cuda"), {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        name = torch.cuda.get_device_name(0)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    peak = None if args.smoke_cpu else peak_for(name, args.peak_tflops)
    print(f"device: {name}; bf16 peak {peak or 'unknown (use --peak-tflops)'} TFLOP/s", flush=True)
    gen_rows = [] if args.skip_generation else bench_generation(args, device, dtype, peak)
    option_rows = bench_options(args, device, peak) if args.options else []
    train_rows = [] if args.skip_training else bench_training(args, device, peak)

    def best(rows, **match):
        rows = [r for r in rows if "images_per_s" in r and all(r.get(k) == v for k, v in match.items())]
        return max(rows, key=lambda r: r["images_per_s"]) if rows else None

    summary = {"device": name, "peak_bf16_tflops": peak, "sd15": gen_rows, "sd15_options": option_rows,
               "vit_b16": [r for r in train_rows if r["variant"] == "train_step"],
               "vit_b16_model_only": [r for r in train_rows if r["variant"] == "model_only"],
               "versions": {"torch": torch.__version__, "cuda": torch.version.cuda}}
    path = common.write_result("gpu-smoke" if args.smoke_cpu else "gpu", summary, MODULE)
    print(f"\ncommand: {common.command_line(MODULE)}")
    for steps in args.steps:
        b = best(gen_rows, steps=steps)
        if b:
            frac = f", {b['fraction_of_peak']:.1%} of bf16 peak" if b.get("fraction_of_peak") is not None else ""
            print(f"  SD-1.5 512 px, {steps} steps, CFG: best {b['images_per_s']:.2f} images/s per GPU "
                  f"(batch {b['batch']}, compile={b['compile']}){frac}")
    b = best(summary["vit_b16"])
    if b:
        mfu = f", MFU {b['mfu']:.1%}" if b.get("mfu") is not None else ""
        print(f"  ViT-B/16 train step (TrainStep: augment + fwd + bwd + AdamW): best {b['images_per_s']:.1f} "
              f"images/s per GPU (batch {b['batch']}){mfu}")
    for row in option_rows:
        print(f"  option {row['option']:<16}: " + (row.get("error") or f"{row['images_per_s']:.2f} images/s, "
                                                  f"x{row['vs_default']:.2f} vs default"))
    g20, t = best(gen_rows, steps=20), b
    if g20 and t:
        print(f"  -> measured generator GPUs per trainer GPU at n = m, R = 9: "
              f"{t['images_per_s'] / (g20['images_per_s'] * 9):.1f} (cost model at equal utilisation: ~37)")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
