"""bench.gpu's pipeline side: one GPU shared by a generator actor and a trainer worker, through Ray.

The generator and trainer measured alone (bench.gpu's other rows) say what each side could do; this
says what a one-GPU machine gets when the real program runs: a local Ray, the paper config
(configs/paper-vitb16-sd15.yaml: SD 1.5 at 512 px, 20 DPM-Solver++ steps, CFG, n = 10, m = 6,
R = 15, ViT-B/16, bf16) with ``generator.num_gpus_per_actor: 0.5`` and ``train.gpus_per_worker: 0.5``,
through ``training.fit`` (Ray Data actor pool -> Ray Train worker). What changes, and why:

- the pipeline is SD 1.5 at real size with random weights, text encoder included (CLIP ViT-L/14's
  text tower; a byte-level tokenizer built from code), saved with ``save_pretrained`` and loaded by
  the actor's own ``from_pretrained``: nothing is downloaded;
- the batch is 24 (4 captions x m = 6, one generator call of 4 captions x 10 images) and each group
  is served once (``stream.reuse: 1``), not 8256 and R = 15: at R = 15 the replay buffer (at least
  R x K groups) fills, then serves each group at 1 step in R, about R x R steps before the first
  evictions: minutes before the stream's steady state. At R = 1 every step waits on fresh images, so
  the window (all but the first WARMUP_STEPS) measures what the shared GPU delivers to the trainer.
  The trainer's share of the GPU is small at either R: per generated image it trains m / n x R
  images (9 at R = 15, ~0.9 TFLOP against ~35 to generate the image);
- captions come from data/simulator_captions.txt, without evaluation or remote storage.

Reported from the run's TensorBoard scalars (bench.end_to_end's steady state): trained images/s
(encoder inputs), the trainer's data-wait fraction, fresh captions/s admitted and the generated
images/s that makes (x n), set against the best in-process generation rate of the SD-1.5 sweep (a
whole GPU, no text encoder).
"""

from __future__ import annotations

import time
from pathlib import Path

from . import common
from .end_to_end import steady_state
from .gpu_generation import SD15_UNET, SD15_VAE, SD_SCHEDULE

PIPELINE_DIR = common.RESULTS / "pipelines" / "sd15-random"
# CLIP ViT-L/14's text tower, SD 1.5's text encoder (123 M parameters).
CLIP_L_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
BATCH = 24  # 4 captions x m = 6: one generator call (4 captions x n = 10) a step
STEPS, WARMUP_STEPS = 12, 3
SMOKE_STEPS, SMOKE_WARMUP_STEPS = 8, 2


def save_sd15(directory: Path, device) -> Path:
    """SD 1.5 at real size, random weights, saved in fp16 (the actor casts to its dtype on load).
    Kept for the next run; written beside ``directory`` and renamed, so a stopped run leaves none half-saved."""
    import shutil

    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from stablerep_ray.tools.tiny_pipeline import write_tiny_clip_tokenizer

    if (directory / "model_index.json").is_file():
        return directory
    diffusers.utils.logging.set_verbosity_error()  # not the note, on the fp16 cast, that no module stays fp32
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(partial / "tokenizer"))
    with torch.device(device):  # random init on the GPU: seconds, not minutes
        text = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT, bos_token_id=tokenizer.bos_token_id,
                                            eos_token_id=tokenizer.eos_token_id,
                                            pad_token_id=tokenizer.pad_token_id))
        unet = diffusers.UNet2DConditionModel(**SD15_UNET)
        vae = diffusers.AutoencoderKL(**SD15_VAE)
    pipe = diffusers.StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer,
        scheduler=diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", **SD_SCHEDULE),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(partial)
    partial.rename(directory)
    return directory


def split_overrides(smoke: bool) -> list[str]:
    """The paper config, made to run on one machine's one GPU (or, for --smoke-cpu, on its CPUs)."""
    steps = SMOKE_STEPS if smoke else STEPS
    local = [
        "captions.source=data/simulator_captions.txt", "eval.data=", "cluster.storage_path=",
        "generator.label_selector={}", "train.label_selector={}", "generator.num_actors=1",
        "generator.num_cpus_per_actor=2", "train.num_workers=1", "train.num_cpus_per_worker=4",
        f"train.batch_size={BATCH}", f"train.steps={steps}", "train.warmup_steps=2", "train.log_every=1",
        f"train.checkpoint_every={steps}", "train.image_grid_every=0", "train.max_failures=0",
        "stream.reuse=1", "stream.buffer_mb=0", "cluster.num_cpus=8", f"output_dir={common.RESULTS / 'runs'}",
        f"name=bench-gpu-split-{time.strftime('%Y%m%d-%H%M%S')}",
    ]
    if smoke:  # the same run on toy shapes: the tiny offline pipeline, a 2-block ViT on 32 px
        return local + [
            f"generator.model={common.TINY_PIPELINE}", "generator.resolution=64", "generator.output_size=48",
            "generator.steps=2", "generator.num_gpus_per_actor=0", "generator.dtype=auto",
            "train.use_gpu=false", "train.precision=auto", "model.name=vit_tiny_patch16_224",
            "model.image_size=32", "model.kwargs={patch_size: 8, depth: 2}", "model.head_hidden_dim=64",
            "model.embed_dim=32",
        ]
    return local + [f"generator.model={PIPELINE_DIR}", "generator.num_gpus_per_actor=0.5",
                    "train.use_gpu=true", "train.gpus_per_worker=0.5"]


def bench_split(device, smoke: bool, alone_images_per_s: float | None) -> dict:
    """One paper-config training run on one shared GPU; its steady-state rates."""
    import ray

    from stablerep_ray.cli import preflight
    from stablerep_ray.storage import check_storage
    from stablerep_ray.training.trainer import fit

    if not smoke:
        save_sd15(PIPELINE_DIR, device)
    config = common.load(str(common.ROOT / "configs" / "paper-vitb16-sd15.yaml"), split_overrides(smoke))
    g, t = config.generator, config.train
    row = {"steps": t.steps, "batch": t.batch_size, "captions_per_step": config.captions_per_worker_step,
           "images_per_caption": g.images_per_caption, "images_per_group": config.group_size,
           "reuse": config.stream.reuse, "captions_per_call": g.captions_per_call,
           "generator_gpus": g.num_gpus_per_actor, "trainer_gpus": t.gpus_per_worker if t.use_gpu else 0.0,
           "run_dir": str(config.run_dir)}
    print(f"  split: 1 generator actor ({g.num_gpus_per_actor:g} GPU) + 1 trainer worker ({row['trainer_gpus']:g} "
          f"GPU), batch {t.batch_size}, {t.steps} steps, R = {config.stream.reuse}", flush=True)
    check_storage(config)  # the checks `stablerep-ray train` makes before Ray starts
    captions_per_pass = preflight(config)
    common.start_ray(num_cpus=config.cluster.num_cpus)
    started = time.perf_counter()
    try:
        result = fit(config, captions_per_pass=captions_per_pass)
    finally:
        ray.shutdown()
    row["wall_s"] = time.perf_counter() - started
    if result.error:
        return {**row, "error": f"training failed: {str(result.error).splitlines()[0][:300]}"}
    skip = (SMOKE_WARMUP_STEPS if smoke else WARMUP_STEPS) - 1  # log points before the window's start
    steady = steady_state(common.read_scalars(config.run_dir / "tensorboard"), t.batch_size, skip)
    admitted = steady.get("admitted_captions_per_s")
    row.update(training=steady, trained_images_per_s=steady["trained_images_per_s"],
               data_wait_fraction=steady["data_wait_fraction"], admitted_captions_per_s=admitted,
               generated_images_per_s=admitted * g.images_per_caption if admitted else None)
    if alone_images_per_s and row["generated_images_per_s"]:
        row["vs_generator_alone"] = row["generated_images_per_s"] / alone_images_per_s
    print(f"  split, steps {steady['from_step']}-{steady['to_step']}: {row['trained_images_per_s']:.1f} images/s "
          f"trained, data-wait {row['data_wait_fraction']:.2f}"
          + (f", {admitted:.2f} fresh captions/s = {row['generated_images_per_s']:.2f} generated images/s"
             if admitted else "")
          + (f" ({row['vs_generator_alone']:.2f} x the sweep's best, a whole GPU)" if "vs_generator_alone" in row
             else "") + f"; {row['wall_s']:.0f} s", flush=True)
    return row
