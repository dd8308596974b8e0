"""GPU throughput of both sides at paper scale: text-to-image generation and ViT-B/16 training.

    uv run python -m bench.gpu --all                    # everything below in one run (< 8 min on an H100)
    uv run python -m bench.gpu                          # SD-1.5 batch sweep at 20 and 50 steps + training
    uv run python -m bench.gpu --families sd15 pixart   # + the PixArt-alpha transformer
    uv run python -m bench.gpu --quick --options        # batch 8 / 132; each speed option alone vs the default
    uv run python -m bench.gpu --compile                # + torch.compile'd denoiser / ViT in the sweep
    uv run python -m bench.gpu --split --skip-generation --skip-training   # the shared-GPU pipeline run alone
    uv run python -m bench.gpu --smoke-cpu --all        # tiny shapes on CPU: checks the code path only

Only meaningful on a GPU: without CUDA it prints a message and exits 0 (nothing written).

Generation (bench/gpu_generation.py): real-size random-weight pipelines (SD 1.5's UNet; PixArt-alpha
512's DiT-XL/2 transformer; SD's VAE), no text encoders (random prompt embeddings), at 512 px with
classifier-free guidance, DPM-Solver++, bf16 and SDPA attention, through the pipeline's own
``__call__`` and the actor's speed options and resize. Per family: a batch sweep (images/s, TFLOP/s
and fraction of bf16 peak from counted FLOPs), then with --options each speed option alone against the
default at the best batch: fp16, channels_last off, VAE slicing, VAE tiling, torch.compile of the
denoiser (--compile-mode; ``--all`` uses mode 'default' to bound the warm-up, the actors use
max-autotune-no-cudagraphs).

Training: the one training step (``TrainStep``, what the train loop runs) for
configs/paper-vitb16-sd15.yaml: timm ViT-B/16 + 3-layer MLP head, the configured objective (the
multi-positive loss, m = 6), BatchAugment (uint8 256 px -> 224 px crops on the GPU), bf16 autocast,
gradient clipping, AdamW; images/s (encoder inputs) and MFU = images/s x 0.105 TFLOP / peak. A
model-only variant (the same step, its augmentation replaced by a fixed 224 px input) separates the
augmentation cost. Batches are whole caption groups: 258 = 43 captions x 6.

One GPU shared (bench/gpu_split.py, --split): the paper config through the real Ray program
(``training.fit``: a generator actor and a trainer worker with 0.5 GPU each, a real-size random SD 1.5
saved and loaded with ``from_pretrained``), batch 24, R = 1; trained images/s, the trainer's data-wait and
the generated images/s it consumed, from the run's TensorBoard scalars.

Peak dense bf16 (TFLOP/s), the planner's table by torch.cuda.get_device_name(): H100 SXM and H200 990,
H100 NVL 835, H100 PCIe 756, A100 312, L40S 362, L40 181, L4 121 (--peak-tflops for other cards).
Results go to bench/results/gpu.json (a printed table too), which `stablerep-ray plan` uses as its
measured rate table (the ``sd15`` and ``vit_b16`` rows).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

from . import common
from .gpu_generation import FAMILIES, Budget, build, count_tflop, generate_fn, tflop_per_image
from .gpu_split import bench_split

MODULE = "bench.gpu"


def peak_for(name: str, override: float | None) -> float | None:
    """The card's dense bf16 peak: ``--peak-tflops`` if given, else the planner's table by device name."""
    from stablerep_ray.tools.planner import PEAK_BF16_TFLOPS, gpu_type_of

    if override:
        return override
    key = gpu_type_of(name)
    return PEAK_BF16_TFLOPS[key] if key else None


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


def guarded(fn):
    """(result, None), or (None, why) when the point ran out of memory or failed: one point (a compile
    that breaks the graph, a batch too large) must not cost a GPU session the rest of the run."""
    import torch

    try:
        return fn(), None
    except torch.cuda.OutOfMemoryError as err:
        torch.cuda.empty_cache()
        return None, f"OOM: {str(err).splitlines()[0]}"
    except Exception as err:  # noqa: BLE001 - recorded in the row and printed
        return None, f"failed: {type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"


def _release(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- generation ----------------------------------------------------------------------------------
def measure_generation(pipe, key: str, *, batch: int, steps: int, args, device, peak, flops: dict, options,
                       budget: Budget) -> dict:
    """One point: images/s of one generator call of ``batch`` images and its fraction of peak."""
    import torch

    resolution = 64 if args.smoke_cpu else 512
    row = {"family": key, "steps": steps, "batch": batch, "resolution": resolution, "guidance": True,
           "compile": options.compile, "channels_last": options.channels_last, "vae_slicing": options.vae_slicing,
           "vae_tiling": options.vae_tiling, "dtype": options.dtype}
    if budget.spent():
        return {**row, "error": f"skipped: past the {budget.seconds:.0f} s budget"}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    fn = generate_fn(pipe, FAMILIES[key], batch=batch, steps=steps, resolution=resolution, device=device,
                     smoke=args.smoke_cpu)
    seconds, error = guarded(lambda: timed(fn, device, warmup=2 if options.compile else 1, iters=args.iters))
    if error:
        row["error"] = error
    else:
        f = tflop_per_image(flops, steps)
        rate = batch / seconds
        row.update(images_per_s=rate, seconds_per_batch=seconds, image_steps_per_s=rate * steps, tflop_per_image=f,
                   tflops=rate * f, fraction_of_peak=rate * f / peak if peak else None)
    if device.type == "cuda":
        row["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    frac = row.get("fraction_of_peak")
    print(f"  {FAMILIES[key].label} {steps:2d} steps batch {batch:3d} compile={options.compile!s:5} {options.dtype} "
          f"channels_last={options.channels_last!s:5} vae_slicing={options.vae_slicing!s:5} "
          f"vae_tiling={options.vae_tiling!s:5}: "
          + (row["error"] if "error" in row else
             f"{row['images_per_s']:7.2f} images/s, {row['tflops']:6.1f} TFLOP/s"
             + (f" = {frac:.1%} of peak" if frac is not None else "")
             + (f", {row['max_memory_gib']:.1f} GiB" if "max_memory_gib" in row else "")), flush=True)
    return row


def default_options(args, **change):
    """The actor's speed settings (a GeneratorConfig) for this run, with ``change`` applied."""
    from stablerep_ray.config import GeneratorConfig

    settings = {"dtype": "fp32" if args.smoke_cpu else args.dtype, "channels_last": not args.no_channels_last,
                "vae_slicing": args.vae_slicing}
    return GeneratorConfig(**{**settings, **change})


def bench_family(key: str, args, device, peak, budget: Budget) -> dict:
    """The batch sweep of one family (and its FLOP count, on the first, uncompiled build)."""
    family, rows, flops = FAMILIES[key], [], None
    resolution = 64 if args.smoke_cpu else 512
    for compiled in ([False, True] if args.compile else [False]):
        options = default_options(args, compile=compiled)
        pipe = build(family, device, options, args.smoke_cpu, args.compile_mode)
        if flops is None:
            flops = count_tflop(pipe, family, resolution, device, args.smoke_cpu)
            print(f"  {family.label}: {flops['tflop_per_step']:.3g} TFLOP per guided step, "
                  f"{flops['tflop_decode']:.3g} per VAE decode (counted, per image)", flush=True)
        for steps in args.steps:
            for batch in args.gen_batches:
                rows.append(measure_generation(pipe, key, batch=batch, steps=steps, args=args, device=device,
                                               peak=peak, flops=flops, options=options, budget=budget))
        del pipe
        _release(device)
    return {"rows": rows, "flops": flops}


# Each generator speed option alone against the default (bf16, SDPA, channels_last, batched VAE decode).
OPTIONS = [
    ("default", {}),
    ("fp16", {"dtype": "fp16"}),
    ("no channels_last", {"channels_last": False}),
    ("VAE slicing", {"vae_slicing": True}),
    ("VAE tiling", {"vae_tiling": True}),
    ("torch.compile", {"compile": True}),
]
GPU_ONLY = {"dtype", "channels_last", "compile"}  # the actor applies these on a GPU only


def bench_options(key: str, args, device, peak, flops: dict, batch: int, budget: Budget) -> list[dict]:
    """One option changed at a time, same steps and batch: what each option is worth on this GPU."""
    rows = []
    for label, change in OPTIONS:
        if args.smoke_cpu and GPU_ONLY & change.keys():
            continue  # on a CPU the actor does not apply it (and half-precision CPU kernels say nothing)
        options = default_options(args, **{"dtype": "fp32" if args.smoke_cpu else "bf16", "channels_last": True,
                                           "vae_slicing": False, **change})
        pipe = None if budget.spent() else build(FAMILIES[key], device, options, args.smoke_cpu, args.compile_mode)
        row = measure_generation(pipe, key, batch=batch, steps=args.steps[0], args=args, device=device, peak=peak,
                                 flops=flops, options=options, budget=budget)
        rows.append({"option": label + (f" (mode {args.compile_mode})" if "compile" in change else ""), **row})
        del pipe
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
                seconds, error = guarded(functools.partial(timed, run, device, 3 if compiled else 2, args.iters * 3))
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
    parser.add_argument("--all", action="store_true",
                        help="SD-1.5 and PixArt at 20 steps (batch sweep, each option alone at the best batch), "
                             "the ViT-B/16 step at batch 258 and --split, within --budget-s")
    parser.add_argument("--families", nargs="+", choices=sorted(FAMILIES), default=["sd15"])
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 50])
    parser.add_argument("--gen-batches", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--train-batches", type=int, nargs="+", default=[66, 132, 258])
    parser.add_argument("--iters", type=int, default=3, help="timed generator batches per point")
    parser.add_argument("--compile", action="store_true", help="also sweep with torch.compile (minutes of warm-up)")
    parser.add_argument("--compile-mode", help="torch.compile mode (default: the actors' max-autotune-no-cudagraphs; "
                                               "'default' with --all)")
    parser.add_argument("--vae-slicing", action="store_true", help="decode one image at a time")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--peak-tflops", type=float, help="dense peak of this card if not in the table")
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--quick", action="store_true", help="batch 8 (generation) and 132 (training) only")
    parser.add_argument("--options", action="store_true",
                        help="also each speed option alone vs the default (fp16, channels_last off, VAE slicing, "
                             "VAE tiling, torch.compile) at the first --steps and --options-batch")
    parser.add_argument("--split", action="store_true",
                        help="one GPU shared by a generator actor and a trainer worker: the paper config through "
                             "Ray (a 12-step run; 56 s with --smoke-cpu on 2 CPU cores)")
    parser.add_argument("--options-batch", type=int, default=8, help="(--all: each family's best sweep batch)")
    parser.add_argument("--budget-s", type=float,
                        help="skip measurements that would start after this many seconds (--all: 360, so that a "
                             "compile started just before it still ends within about 8 min)")
    parser.add_argument("--smoke-cpu", action="store_true",
                        help="toy shapes on CPU, to check the script (writes gpu-smoke.json, not gpu.json)")
    args = parser.parse_args(argv)

    import torch

    from stablerep_ray.generation.diffusion import COMPILE_MODE
    from stablerep_ray.tools.planner import generation_tflop

    if args.all:
        args.families, args.steps, args.train_batches = sorted(FAMILIES, reverse=True), [20], [258]
        args.options = args.split = True
        args.compile_mode = args.compile_mode or "default"
        args.budget_s = args.budget_s or 360.0
    args.compile_mode = args.compile_mode or COMPILE_MODE
    if args.quick:
        args.gen_batches, args.train_batches = [8], [132]
    if args.smoke_cpu:
        device, name = torch.device("cpu"), "cpu (smoke test: toy shapes)"
        args.steps, args.gen_batches, args.train_batches, args.iters = [2], [1, 2], [12], 1
    elif not torch.cuda.is_available():
        print("bench.gpu: no CUDA device here (torch.cuda.is_available() is False). This benchmark measures "
              "GPU throughput only; run it on a GPU node (`uv run python -m bench.gpu`), or check the script "
              "with --smoke-cpu. Nothing was measured or written.")
        return 0
    else:
        device, name = torch.device("cuda"), torch.cuda.get_device_name(0)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    peak = None if args.smoke_cpu else peak_for(name, args.peak_tflops)
    budget = Budget(args.budget_s)
    print(f"device: {name}; bf16 peak {peak or 'unknown (use --peak-tflops)'} TFLOP/s", flush=True)
    result_name = "gpu-smoke" if args.smoke_cpu else "gpu"
    families, train_rows, split = {}, [], None

    def summary() -> dict:
        return {"device": name, "peak_bf16_tflops": peak, "families": args.families,
                "budget": {"seconds": args.budget_s, "elapsed": budget.elapsed()},
                **{key: r["rows"] for key, r in families.items()},
                **{f"{key}_options": r.get("options", []) for key, r in families.items()},
                "flops": {key: r["flops"] for key, r in families.items()},
                "vit_b16": [r for r in train_rows if r["variant"] == "train_step"],
                "vit_b16_model_only": [r for r in train_rows if r["variant"] == "model_only"],
                "split": split,
                "versions": {"torch": torch.__version__, "cuda": torch.version.cuda}}

    # After each part, what is measured so far goes to <name>.partial.json: a run stopped from outside
    # (a device call's time limit) keeps every finished part.
    for key in ([] if args.skip_generation else args.families):
        families[key] = bench_family(key, args, device, peak, budget)
        common.write_partial(result_name, summary(), MODULE)
    if not args.skip_training:
        train_rows = bench_training(args, device, peak)
        common.write_partial(result_name, summary(), MODULE)
    if args.split:
        alone = best(families.get("sd15", {}).get("rows", []), steps=args.steps[0])
        if budget.spent():
            split = {"error": f"skipped: past the {budget.seconds:.0f} s budget"}
        else:  # a failure here must not lose the rows measured before it
            split, error = guarded(lambda: bench_split(device, args.smoke_cpu, alone and alone["images_per_s"]))
            split = split or {"error": error}
        _release(device)
        common.write_partial(result_name, summary(), MODULE)
    for key, result in families.items():
        best_row = best(result["rows"], steps=args.steps[0])
        batch = best_row["batch"] if args.all and best_row else args.options_batch
        result["options"] = []
        if args.options:
            result["options"] = bench_options(key, args, device, peak, result["flops"], batch, budget)
            common.write_partial(result_name, summary(), MODULE)

    final = summary()
    path = common.write_result(result_name, final, MODULE)
    print(f"\ncommand: {common.command_line(MODULE)}  ({budget.elapsed():.0f} s)")
    print_table(final, families, args, generation_tflop)
    print(f"wrote {path}")
    return 0


def best(rows, **match):
    rows = [r for r in rows if "images_per_s" in r and all(r.get(k) == v for k, v in match.items())]
    return max(rows, key=lambda r: r["images_per_s"]) if rows else None


def print_table(summary: dict, families: dict, args, generation_tflop) -> None:
    """The run's result in one table: best batch per family and steps, each option, the training step."""

    def line(what, row, peak_key="fraction_of_peak", tflop=True, vs=""):
        if "images_per_s" not in row:
            return print(f"{what:<52} {row['batch']:>5} {row.get('error')}")
        frac = row.get(peak_key)
        print(f"{what:<52} {row['batch']:>5} {row['images_per_s']:>9.2f} "
              f"{row['tflop_per_image'] if tflop else '':>9.4} {'-' if frac is None else f'{frac:.1%}':>8} {vs:>10}")

    print(f"{'what':<52} {'batch':>5} {'images/s':>9} {'TFLOP/img':>9} {'of peak':>8} {'vs default':>10}")
    for key, result in families.items():
        label = FAMILIES[key].label
        for steps in args.steps:
            if b := best(result["rows"], steps=steps):
                line(f"{label}, {b['resolution']} px, {steps} steps, CFG: best batch", b)
        for row in result["options"]:
            line(f"{label} option: {row['option']}", row, vs=f"x{row['vs_default']:.2f}" if "vs_default" in row else "")
    if "sd15" in families and not args.smoke_cpu:
        counted = tflop_per_image(families["sd15"]["flops"], 20)
        print(f"  SD-1.5 F(20) counted {counted:.1f} TFLOP per image; cost model {generation_tflop(20, 512):.1f}")
    if t := best(summary["vit_b16"]):
        line("ViT-B/16 train step (augment+fwd+bwd+AdamW), MFU", t, peak_key="mfu", tflop=False)
    g20 = best(summary.get("sd15", []), steps=20)
    if g20 and t:
        print(f"  -> measured SD-1.5 generator GPUs per trainer GPU at 9 uses of an image (the paper config): "
              f"{t['images_per_s'] / (g20['images_per_s'] * 9):.1f} (cost model at equal utilisation: ~37)")
    if split := summary["split"]:
        print("one GPU shared, generator actor 0.5 + trainer worker 0.5, paper config at batch 24, R = 1, through Ray: "
              + (split["error"] if "error" in split else
                 f"{split['trained_images_per_s']:.1f} images/s trained, data-wait {split['data_wait_fraction']:.0%}"
                 + (f", {split['generated_images_per_s']:.2f} generated images/s consumed"
                    if split.get("generated_images_per_s") else "")
                 + (f" = {split['vs_generator_alone']:.2f} x the generator alone" if "vs_generator_alone" in split
                    else "")))


if __name__ == "__main__":
    sys.exit(main())
