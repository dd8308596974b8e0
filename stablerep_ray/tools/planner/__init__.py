"""Split a GPU budget between generator actors and trainer workers (``stablerep-ray plan``).

Units: rates are images/s *per device* (per GPU; per actor / per worker for CPU-only configs).
The stream turns them into captions/s:

* a trainer worker at full speed trains ``t`` images/s, i.e. ``t / (g * R)`` NEW captions/s, where
  ``g`` = encoder inputs per caption in a batch (``stream.images_per_group`` m, or 2 for SimCLR) and
  ``R`` = ``stream.reuse`` (each caption group is served R times before eviction);
* a generator device makes ``s`` images/s, i.e. ``s / n`` captions/s (``n`` = images per caption).

So one trainer device needs ``k = t * n / (s * g * R)`` generator devices. With both sides at the same
fraction of peak, ``t / s = F(S) / 0.105`` (the cost model: one SD image with classifier-free
guidance costs ``F(S) = 1.61 S + 2.5`` TFLOP, one ViT-B/16 training view 0.105 TFLOP), and with
``n = m``: ``k = F(S) / (0.105 R)``, about 37 at 20 steps and R = 9.

The trainer waits for data a fraction ``max(0, 1 - supply / demand)`` of the time; the plan is the
split of the budget with the highest trained images/s among those keeping that wait under 5 %.

Rates come from, in this order: a measurement on this machine (``measure=True``; saved to
``bench/results/planner-rates.json`` and reused for the same config and device), the GPU benchmark's
table (``bench/results/gpu.json``, written by ``python -m bench.gpu``), or an ESTIMATE from the
cost model's FLOP counts at an assumed fraction of the GPU's bf16 peak (SD-1.x/2.x-architecture
generators and timm ViT trainers only).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ...config import Config, GeneratorConfig

# -- the cost model (see the cost-model reference: FLOPs counted on the diffusers configs) -------
UNET_TFLOP_512 = 0.805  # one SD-1.5/2.1 UNet forward, one sample, 64x64 latent (2 per step with CFG)
VAE_DECODE_TFLOP_512 = 2.5  # VAE decode 64x64 latent -> 512 px
VIT_B16_TRAIN_TFLOP = 0.105  # ViT-B/16, one 224 px view, forward + backward
VIT_B16_PARAMS = 85.8e6  # encoder parameters of vit_base_patch16_224 (num_classes=0)
VIT_B16_TOKENS = 197
PEAK_BF16_TFLOPS = {"H100": 990.0, "H200": 990.0, "A100": 312.0}
ASSUMED_UTILISATION = 0.40  # fraction of bf16 peak assumed for BOTH sides in the estimate
WAIT_TARGET = 0.05  # the trainer's data-wait fraction the plan keeps below
IDLE_WARNING = 0.10  # check_balance: warn when generators would idle this fraction or more
# check_call_length: Ray Data spends a fixed ~25 ms of CPU per block (executor, raylet, consumer) on a
# 2-core machine; calls of >= 0.5 s keep that under 5 % (bench.generation: 0.11 s calls 0.69, 0.45 s
# calls 0.95, 0.9 s calls 1.08 of the in-process rate).
MIN_CALL_SECONDS = 0.5
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
    return here if here.is_dir() else Path(__file__).resolve().parent.parent / "bench" / "results"


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
    """Training TFLOP per encoder input (forward + backward) for timm ViTs; None for others.

    0.105 for ViT-B/16 at 224 px (the cost model); other ViTs scale it by encoder parameters x tokens
    (the 6 * params * tokens rule, which gives 0.10 for ViT-B/16).
    """
    m = config.model
    if m.name == "vit_base_patch16_224" and m.image_size == 224 and not m.kwargs:
        return VIT_B16_TRAIN_TFLOP
    if not m.name.startswith(("vit_", "deit_")):
        return None
    import torch

    from ...models import create_encoder

    with torch.device("meta"):
        encoder = create_encoder(m)
    params = sum(p.numel() for p in encoder.parameters())
    patch = encoder.patch_embed.patch_size[0]
    tokens = (m.image_size // patch) ** 2 + getattr(encoder, "num_prefix_tokens", 1)
    return VIT_B16_TRAIN_TFLOP * params / VIT_B16_PARAMS * tokens / VIT_B16_TOKENS


def detect_gpu_type(default: str = "H100") -> tuple[str, str]:
    """(table key, how it was chosen): from torch.cuda.get_device_name() when a GPU is visible."""
    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            for key in PEAK_BF16_TFLOPS:
                if key in name.upper():
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
    estimate = estimate_rates(config, _gpu_key(device))
    if (gen_rate is None or train_rate is None) and estimate is None:
        return None
    return Rates(
        generator=gen_rate if gen_rate is not None else estimate.generator,
        trainer=train_rate if train_rate is not None else estimate.trainer,
        generator_source=gen_source or estimate.generator_source,
        trainer_source=train_source or estimate.trainer_source,
        estimate=gen_rate is None or train_rate is None,
    )


def _gpu_key(device_name: str) -> str | None:
    return next((k for k in PEAK_BF16_TFLOPS if k in str(device_name).upper()), None)


# -- measuring on this machine -------------------------------------------------------------------
def fingerprint(config: Config, device: str) -> str:
    """What the measured rates depend on: generator, model, per-worker batch, device."""
    g, t = config.generator, config.train
    relevant = {
        "generator": g.model_dump(mode="json", exclude={"num_actors", "label_selector", "seed"}),
        "model": config.model.model_dump(mode="json"),
        "augment": config.augment.model_dump(mode="json"),
        "objective": t.objective,
        "per_worker_batch": t.batch_size // t.num_workers,
        "precision": t.precision,
        "num_cpus_per_worker": t.num_cpus_per_worker,
        "use_gpu": t.use_gpu,
        "device": device,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _device_name(cuda: bool) -> str:
    import platform

    if cuda:
        import torch

        return torch.cuda.get_device_name(0)
    return f"cpu:{platform.node()}:{os.cpu_count()}"


def _caption_batch(config: Config, size: int, offset: int) -> dict:
    import numpy as np

    from ...captions import plan_chunks, read_chunk

    ids, texts, _ = read_chunk(config.captions, plan_chunks(config.captions)[0])
    pick = [(offset + i) % len(ids) for i in range(size)]
    return {
        "chunk": np.zeros(size, dtype=np.int64),
        "row": np.asarray(pick, dtype=np.int32),
        "chunk_rows": np.full(size, len(ids), dtype=np.int32),
        "caption_id": np.asarray([ids[i] for i in pick], dtype=np.int64),
        "caption": np.asarray([texts[i] for i in pick], dtype=object),
    }


def _timed(fn, min_calls: int, min_seconds: float, max_seconds: float) -> tuple[int, float]:
    """Call fn() once to warm up, then until min_calls and min_seconds (or max_seconds); (calls, s)."""
    fn()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if (calls >= min_calls and elapsed >= min_seconds) or elapsed >= max_seconds:
            return calls, elapsed


def measure_generator_rate(config: Config, min_seconds: float = 5.0, max_seconds: float = 120.0) -> float:
    """images/s of one generator actor, in-process, with the actor's CPU threads (warm-up excluded)."""
    import torch

    from ...generation import GeneratorActor

    gen = config.generator
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, int(gen.num_cpus_per_actor)))
    actor = GeneratorActor(gen)
    batches = [_caption_batch(config, gen.captions_per_call, i * gen.captions_per_call) for i in range(4)]
    state = {"i": 0}

    def call():
        actor(batches[state["i"] % len(batches)])
        state["i"] += 1

    calls, seconds = _timed(call, 2, min_seconds, max_seconds)
    return calls * gen.captions_per_call * gen.images_per_caption / seconds


def measure_trainer_rate(config: Config, min_seconds: float = 5.0, max_seconds: float = 120.0) -> float:
    """images/s of one trainer worker at full speed: augmentation + forward + loss + backward + AdamW
    on the per-worker batch, in-process (no DDP all-reduce, no data wait)."""
    import numpy as np
    import torch

    from ...augment import BatchAugment
    from ...losses import multi_positive_loss
    from ...models import build_model
    from ...training import autocast_dtype, build_optimizer

    t = config.train
    device = torch.device("cuda" if t.use_gpu and torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(t.num_cpus_per_worker)))
    model = build_model(config.model_copy(update={"train": t.model_copy(update={"objective": "stablerep"})}))
    model = model.to(device)
    optimizer = build_optimizer(model, config)
    augment = BatchAugment(config.augment, config.model.image_size)
    views = 2 if t.objective == "simclr" else 1
    per_worker = t.batch_size // t.num_workers // views
    size = config.generator.output_size
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (per_worker, size, size, 3), dtype=np.uint8)).to(device)
    labels = torch.arange(per_worker, device=device) // config.images_drawn_per_group
    generator = torch.Generator(device).manual_seed(0)
    amp = autocast_dtype(config, device)

    def step():
        x = torch.cat([augment(images, generator) for _ in range(views)])
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = multi_positive_loss(model(x), labels.repeat(views), t.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    steps, seconds = _timed(step, 2, min_seconds, max_seconds)
    return steps * per_worker * views / seconds


def measured_rates(config: Config, measure: bool, results: Path | None = None) -> Rates | None:
    """Measure here (and save), or reuse a measurement saved for the same config and device."""
    import torch

    cuda = torch.cuda.is_available()
    device = _device_name(cuda)
    key = fingerprint(config, device)
    path = (results or results_dir()) / "planner-rates.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if not measure:
        entry = saved.get(key)
        if not entry:
            return None
        return Rates(entry["generator"], entry["trainer"],
                     f"measured on {device} at {entry['time']} ({path})",
                     f"measured on {device} at {entry['time']} ({path})")
    on_gpu_t, on_gpu_g = uses_gpus(config)
    if (on_gpu_t or on_gpu_g) and not cuda:
        raise RuntimeError(
            "--measure: this config runs on GPUs but none is visible here; measure on a GPU node, or "
            "run `python -m bench.gpu` there and copy bench/results/gpu.json"
        )
    gen = measure_generator_rate(config)
    train = measure_trainer_rate(config)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    saved[key] = {"config": config.name, "device": device, "generator": gen, "trainer": train, "time": stamp}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(saved, indent=2))
    where = f"measured now on {device} (in-process, warm-up excluded; saved to {path})"
    notes = []
    if on_gpu_g and config.generator.num_gpus_per_actor < 1:
        notes.append("the generator was measured on a whole GPU; a fractional actor is assumed to get "
                     "its fraction of that rate")
    return Rates(gen, train, where, where + "; without DDP all-reduce", notes=notes)


def rates_for(config: Config, measure: bool = False, gpu_type: str | None = None,
              results: Path | None = None) -> Rates | None:
    """The best rates available for a config (see the module docstring for the order)."""
    return (measured_rates(config, measure, results)
            or table_rates(config, results)
            or estimate_rates(config, gpu_type))


# -- the split -----------------------------------------------------------------------------------
@dataclass
class Split:
    trainers: int
    actors: int
    trained_images_per_s: float  # encoder inputs/s over all trainer workers
    captions_per_s: float  # new captions/s generated and consumed
    generated_images_per_s: float
    wait: float  # trainer data-wait fraction
    generator_idle: float  # fraction of generator capacity unused (backpressure)


@dataclass
class Budget:
    """What is being split, and what one trainer worker / one actor costs of it."""

    total: float
    trainer_cost: float
    actor_cost: float
    unit: str  # "GPU" / "CPU"


def evaluate_split(trainers: int, actors: int, actor_rate: float, worker_rate: float,
                   n: int, group_size: int, reuse: int) -> Split:
    """Throughput of a split (rates per actor / per trainer worker, images/s)."""
    supply = actors * actor_rate / n  # captions/s
    demand = trainers * worker_rate / (group_size * reuse)  # captions/s at full speed
    used = min(supply, demand)
    return Split(
        trainers=trainers,
        actors=actors,
        trained_images_per_s=used * group_size * reuse,
        captions_per_s=used,
        generated_images_per_s=used * n,
        wait=max(0.0, 1 - supply / demand) if demand else 0.0,
        generator_idle=max(0.0, 1 - demand / supply) if supply else 0.0,
    )


def best_split(budget: Budget, actor_rate: float, worker_rate: float, n: int, group_size: int,
               reuse: int) -> tuple[Split | None, Split | None]:
    """(best split with wait < WAIT_TARGET or None, best split overall or None if nothing fits)."""
    ok = best = None
    trainers = 1
    while trainers * budget.trainer_cost <= budget.total + 1e-9:
        actors = int((budget.total - trainers * budget.trainer_cost) / budget.actor_cost + 1e-9)
        if actors >= 1:
            split = evaluate_split(trainers, actors, actor_rate, worker_rate, n, group_size, reuse)
            if best is None or split.trained_images_per_s > best.trained_images_per_s:
                best = split
            if split.wait < WAIT_TARGET and (ok is None or split.trained_images_per_s > ok.trained_images_per_s):
                ok = split
        trainers += 1
    return ok, best


def budget_for(config: Config, devices: float) -> Budget:
    on_gpu_t, on_gpu_g = uses_gpus(config)
    if on_gpu_t != on_gpu_g:
        raise ValueError(
            "train.use_gpu and generator.num_gpus_per_actor disagree (one side on GPUs, the other on "
            "CPUs); the planner splits one kind of device: put both on GPUs (or both on CPUs)"
        )
    if on_gpu_t:
        return Budget(devices, 1.0, config.generator.num_gpus_per_actor, "GPU")
    t, g = config.train, config.generator
    return Budget(devices, max(t.num_cpus_per_worker, 1e-9), max(g.num_cpus_per_actor, 1e-9), "CPU")


def per_unit_rates(config: Config, rates: Rates) -> tuple[float, float]:
    """(images/s of one actor, images/s of one trainer worker) from per-device rates."""
    _, on_gpu_g = uses_gpus(config)
    actor = rates.generator * (config.generator.num_gpus_per_actor if on_gpu_g else 1)
    return actor, rates.trainer


def check_balance(config: Config, gen_rate: float, train_rate: float) -> str | None:
    """A warning when the configured split starves the trainer or leaves generators idle, else None.

    ``gen_rate``: images/s of ONE generator actor; ``train_rate``: images/s (encoder inputs) of ONE
    trainer worker at full speed. E.g. ``check_balance(config, *per_unit_rates(config, rates_for(config)))``.
    """
    g, t, n, gs, reuse = config.generator, config.train, config.generator.images_per_caption, \
        config.group_size, config.stream.reuse
    if gen_rate <= 0 or train_rate <= 0:
        return None
    split = evaluate_split(t.num_workers, g.num_actors, gen_rate, train_rate, n, gs, reuse)
    supply = g.num_actors * gen_rate / n
    demand = t.num_workers * train_rate / (gs * reuse)
    head = (f"{g.num_actors} generator actors make {supply:.3g} captions/s; {t.num_workers} trainer "
            f"workers need {demand:.3g} new captions/s at full speed (stream.reuse={reuse}, "
            f"{gs} images per caption per batch)")
    if split.wait >= WAIT_TARGET:
        actors_needed = math.ceil((1 - WAIT_TARGET) * demand * n / gen_rate - 1e-9)
        reuse_needed = math.ceil(reuse * (1 - WAIT_TARGET) * demand / supply - 1e-9)
        return (f"generation starves the trainer: {head}, so the trainer waits for data ~{split.wait:.0%} "
                f"of the time. Use generator.num_actors >= {actors_needed}, or stream.reuse >= "
                f"{reuse_needed}, or fewer train.num_workers (`stablerep-ray plan` computes the split)")
    needed = max(1, math.ceil(demand * n / gen_rate - 1e-9))
    if split.generator_idle >= IDLE_WARNING and g.num_actors - needed >= 1:
        return (f"generators idle: {head}, so ~{split.generator_idle:.0%} of the generator capacity is "
                f"unused (Ray Data backpressure throttles it). {needed} actors suffice; move the rest to "
                f"training (train.num_workers) or lower stream.reuse for fresher images")
    return None


def check_call_length(config: Config, gen_rate: float) -> str | None:
    """A warning when one generator call is so short that Ray Data's per-block cost shows, else None.

    ``gen_rate``: images/s of ONE generator actor. One call renders ``captions_per_call x n`` images
    and becomes one block of the stream.
    """
    g = config.generator
    if gen_rate <= 0:
        return None
    seconds = g.captions_per_call * g.images_per_caption / gen_rate
    if seconds >= MIN_CALL_SECONDS:
        return None
    needed = math.ceil(MIN_CALL_SECONDS * gen_rate / g.images_per_caption)
    suggested = 1 << (needed - 1).bit_length()
    return (f"short generator calls: {g.captions_per_call} captions x {g.images_per_caption} images take "
            f"~{seconds * 1e3:.0f} ms per call, so Ray Data's fixed per-block cost (~25 ms of CPU) costs "
            f"throughput; set generator.captions_per_call >= {suggested} (calls of >= {MIN_CALL_SECONDS:g} s)")


# -- the report ----------------------------------------------------------------------------------
def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def plan(config: Config, gpus: float, measure: bool = False, gpu_type: str | None = None,
         results: Path | None = None) -> str:
    """The split of ``gpus`` devices between generator actors and trainer workers, as text."""
    lines: list[str] = []
    try:
        budget = budget_for(config, gpus)
    except ValueError as err:
        return f"plan: {err}"
    g, t = config.generator, config.train
    n, gs, reuse, m = g.images_per_caption, config.group_size, config.stream.reuse, config.images_drawn_per_group
    unit = budget.unit
    if unit == "CPU":
        lines.append(f"config {config.name!r} runs on CPUs (train.use_gpu=false, generator."
                     f"num_gpus_per_actor=0): --gpus {gpus:g} is read as {gpus:g} CPUs to split "
                     f"({t.num_cpus_per_worker:g} per trainer worker, {g.num_cpus_per_actor:g} per actor)")
    try:
        rates = rates_for(config, measure, gpu_type, results)
    except RuntimeError as err:
        return f"plan: {err}"
    if rates is None:
        return "\n".join(lines + [
            f"plan: no rate table applies to config {config.name!r} (generator backend {g.backend}, "
            f"model {g.model or '-'}; encoder {config.model.name}): the FLOP estimate covers SD-1.x/2.x "
            f"generators and ViT trainers only. Run `stablerep-ray plan ... --measure` on the hardware "
            f"the run will use (it measures and saves the rates)."
        ])
    actor_rate, worker_rate = per_unit_rates(config, rates)
    per = "GPU" if unit == "GPU" else "actor / worker"
    lines += [
        f"rates per {per}: generator {rates.generator:,.4g} images/s, trainer {rates.trainer:,.4g} images/s",
        f"  generator: {rates.generator_source}",
        f"  trainer:   {rates.trainer_source}",
        *[f"  note: {note}" for note in rates.notes],
    ]
    k_units = generators_per_trainer(rates.generator, rates.trainer, n, gs, reuse)
    uses = reuse * m / n
    lines.append(
        f"stream: n={n} images per caption, {gs} per caption per batch, R={reuse} serves -> one trainer "
        f"worker needs {worker_rate / (gs * reuse):,.4g} new captions/s = {worker_rate * n / (gs * reuse):,.4g} "
        f"generated images/s = {k_units:,.3g} generator {unit}s per trainer {'GPU' if unit == 'GPU' else 'worker'}"
        + (f" (each generated image is used R*m/n = {uses:.2g} times)" if t.objective != "simclr" else "")
    )
    ok, best = best_split(budget, actor_rate, worker_rate, n, gs, reuse)
    if best is None:
        need = budget.trainer_cost + budget.actor_cost
        return "\n".join(lines + [
            f"plan: {gpus:g} {unit}s are too few: one trainer worker ({budget.trainer_cost:g} {unit}) and "
            f"one generator actor ({budget.actor_cost:g} {unit}) need {need:g}"
        ])
    if ok is None:
        min_total = budget.trainer_cost + math.ceil((1 - WAIT_TARGET) * worker_rate * n / (gs * reuse)
                                                    / actor_rate - 1e-9) * budget.actor_cost
        one = evaluate_split(1, int((gpus - budget.trainer_cost) / budget.actor_cost + 1e-9),
                             actor_rate, worker_rate, n, gs, reuse)
        reuse_needed = math.ceil(reuse * (1 - WAIT_TARGET) * (worker_rate / (gs * reuse))
                                 / (one.actors * actor_rate / n) - 1e-9)
        lines.append(
            f"plan: {gpus:g} {unit}s are too few to keep the trainer's data-wait under {WAIT_TARGET:.0%}: "
            f"even 1 trainer worker + {_n(one.actors, 'generator actor')} waits ~{one.wait:.0%} "
            f"({one.trained_images_per_s:,.4g} images/s trained). Needs >= {min_total:g} {unit}s at "
            f"stream.reuse={reuse}, or stream.reuse >= {reuse_needed} with {gpus:g} {unit}s"
        )
        chosen = best
    else:
        chosen = ok
    used = chosen.trainers * budget.trainer_cost + chosen.actors * budget.actor_cost
    bottleneck = ("generation (the trainer waits for data)" if chosen.wait >= WAIT_TARGET else
                  "training (generators are throttled by backpressure "
                  f"{chosen.generator_idle:.0%} of the time)" if chosen.generator_idle > 0.005 else
                  "balanced")
    lines += [
        f"split of {gpus:g} {unit}s: {_n(chosen.trainers, 'trainer worker')} + "
        f"{_n(chosen.actors, 'generator actor')} "
        f"({budget.actor_cost:g} {unit} each){'' if used >= gpus - 1e-9 else f'; {gpus - used:g} {unit}s unused'}",
        f"expected: {chosen.trained_images_per_s:,.4g} images/s trained, {chosen.captions_per_s:,.4g} "
        f"captions/s generated ({chosen.generated_images_per_s:,.4g} images/s), trainer data-wait "
        f"~{chosen.wait:.0%}; bottleneck: {bottleneck}",
        f"set: generator.num_actors={chosen.actors} train.num_workers={chosen.trainers}",
    ]
    unit_batch = gs * chosen.trainers
    if t.batch_size % unit_batch:
        lines.append(f"  and train.batch_size to a multiple of {gs} x {chosen.trainers} = {unit_batch} "
                     f"(e.g. {max(unit_batch, round(t.batch_size / unit_batch) * unit_batch)}; now {t.batch_size})")
    if rates.estimate:
        lines.append("  (rates are an ESTIMATE from the cost model, not a measurement: check "
                     "TensorBoard throughput/data_wait_fraction in the first minutes of the run)")
    warning = check_balance(config, actor_rate, worker_rate)
    lines.append(f"current config ({g.num_actors} actors, {t.num_workers} workers): "
                 + (warning or "balanced (trainer data-wait under 5 %, no idle generator actor)"))
    short_calls = check_call_length(config, actor_rate)
    if short_calls:
        lines.append(f"  and {short_calls}")
    return "\n".join(lines)
