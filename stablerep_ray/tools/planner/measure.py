"""Rates measured on this machine: one generator actor and one trainer worker, in-process.

The trainer side runs the one training step (``training.step.TrainStep``), so a measured rate is the
rate of what training runs, whatever the objective. Measurements are saved under a fingerprint of
what they depend on and reused; :func:`rates_for` picks the best available source (a measurement,
the GPU benchmark's table, the cost-model estimate).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from ...config import Config
from .costs import Rates, estimate_rates, results_dir, table_rates, uses_gpus


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
    from ...captions import caption_rows, plan_chunks, read_chunk

    positions, texts, _ = read_chunk(config.captions, plan_chunks(config.captions)[0])
    pick = [(offset + i) % len(positions) for i in range(size)]
    return caption_rows(0, [positions[i] for i in pick], [texts[i] for i in pick])


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
    """Encoder inputs/s of one trainer worker at full speed, in-process (no DDP all-reduce, no data wait).

    It times THE training step (``TrainStep``: the configured objective's views, forward and loss,
    backward, clipping, optimiser and schedule) on a synthetic batch of the per-worker size.
    """
    import torch

    from ...training.step import TrainStep, step_memory, synthetic_batch

    t = config.train
    device = torch.device("cuda" if t.use_gpu and torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(t.num_cpus_per_worker)))
    step = TrainStep.build(config, device)
    captions = config.captions_per_worker_step
    batch = synthetic_batch(config, captions)
    out_of_memory = step_memory(config)

    def run():
        with out_of_memory:
            step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()

    steps, seconds = _timed(run, 2, min_seconds, max_seconds)
    return steps * captions * config.group_size / seconds


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

