"""The split of a device budget between generator actors and trainer workers, and its warnings.

Given rates per actor and per worker (``costs`` / ``measure``), this is the stream arithmetic: supply
and demand in captions/s, the trainer's data-wait, the best split (:func:`best_split`), the warnings
the CLI prints for a configured split (:func:`check_balance`, :func:`check_call_length`,
:func:`check_image_use`) and the ``stablerep-ray plan`` report (:func:`plan`). What an objective
feeds the encoder per caption comes from its class (``config.group_size``, ``caption_positives``),
never from its name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ...config import Config
from ...training.objectives import get_objective
from ...training.optim import describe_lr
from .captions import caption_stage_line, llm_devices
from .costs import Rates, generators_per_trainer, uses_gpus
from .measure import rates_for

WAIT_TARGET = 0.05  # the trainer's data-wait fraction the plan keeps below
IDLE_WARNING = 0.10  # check_balance: warn when generators would idle this fraction or more
# check_call_length: Ray Data spends a fixed amount of CPU per block (executor, raylet, consumer), so a
# generator call must be long enough to dwarf it (call sizes measured in docs/performance.md).
MIN_CALL_SECONDS = 0.5
UNUSED_WARNING = 0.10  # check_image_use: warn when this share of the generated images is never trained on


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
        return Budget(devices, config.train.gpus_per_worker, config.generator.num_gpus_per_actor, "GPU")
    t, g = config.train, config.generator
    return Budget(devices, max(t.num_cpus_per_worker, 1e-9), max(g.num_cpus_per_actor, 1e-9), "CPU")


def per_unit_rates(config: Config, rates: Rates) -> tuple[float, float]:
    """(images/s of one actor, images/s of one trainer worker) from per-device rates; a worker or actor
    holding a share of a GPU is counted at that share of its rate (time-sharing, at best)."""
    on_gpu_t, on_gpu_g = uses_gpus(config)
    actor = rates.generator * (config.generator.num_gpus_per_actor if on_gpu_g else 1)
    return actor, rates.trainer * (config.train.gpus_per_worker if on_gpu_t else 1)


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
            f"~{seconds * 1e3:.0f} ms per call, so Ray Data's fixed per-block cost costs "
            f"throughput; set generator.captions_per_call >= {suggested} (calls of >= {MIN_CALL_SECONDS:g} s)")


def check_image_use(config: Config) -> str | None:
    """A warning when a sizeable share of the generated images is never trained on, else None.

    Each of a caption group's R serves draws a fresh d of its n images (d: ``config.images_drawn_per_group``),
    so an image is never drawn with probability (1 - d/n)^R: at R = 1 and n = 2m half of the generation,
    the run's cost, is thrown away. The simulator's images cost nothing and are not warned about.
    """
    n, d, reuse = config.generator.images_per_caption, config.images_drawn_per_group, config.stream.reuse
    unused = (1 - d / n) ** reuse
    if config.generator.backend == "simulator" or unused < UNUSED_WARNING:
        return None
    reuse_needed = math.ceil(math.log(UNUSED_WARNING) / math.log(1 - d / n) - 1e-9)
    return (f"generator.images_per_caption: {unused:.0%} of the generated images are never trained on (a caption "
            f"is served {_n(reuse, 'time')}, each time {d} of its {n} images drawn); set it to {d}, or "
            f"stream.reuse to {reuse_needed} or more")


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
    held = llm_devices(config, unit)
    if held:  # the language-model pool's devices are not the split's to give
        budget.total -= held
        gpus -= held
        lines.append(f"captions.synth: {config.captions.synth.num_actors} language-model actors hold {held:g} "
                     f"{unit}s; {budget.total:g} are left to split")
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
        f"optimiser: {describe_lr(config)}, {t.warmup_steps} warm-up steps of {t.steps}",
        f"rates per {per}: generator {rates.generator:,.4g} images/s, trainer {rates.trainer:,.4g} images/s",
        f"  generator: {rates.generator_source}",
        f"  trainer:   {rates.trainer_source}",
        *[f"  note: {note}" for note in rates.notes],
    ]
    k_units = generators_per_trainer(rates.generator, rates.trainer, n, gs, reuse)
    caption_positives = get_objective(t.objective).caption_positives  # else the R*m/n reuse does not apply
    uses = reuse * m / n
    lines.append(
        f"stream: n={n} images per caption, {gs} per caption per batch, R={reuse} serves -> one trainer "
        f"worker needs {worker_rate / (gs * reuse):,.4g} new captions/s = {worker_rate * n / (gs * reuse):,.4g} "
        f"generated images/s = {k_units:,.3g} generator {unit}s per trainer {'GPU' if unit == 'GPU' else 'worker'}"
        + (f" (each generated image is used R*m/n = {uses:.2g} times)" if caption_positives else "")
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
    caption_line = caption_stage_line(config, chosen.captions_per_s, results)
    if caption_line:
        lines.append(caption_line)
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
    for warning in (check_call_length(config, actor_rate), check_image_use(config)):
        if warning:
            lines.append(f"  and {warning}")
    return "\n".join(lines)
