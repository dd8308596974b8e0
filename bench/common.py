"""Shared helpers for the benchmarks: Ray start-up, configs, caption batches, result files."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import threading
import time
from pathlib import Path

import stablerep_ray  # noqa: F401  (sets RAY_ENABLE_UV_RUN_RUNTIME_ENV=0 before ray is imported)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TINY_PIPELINE = "outputs/tiny-sd"


def arg_parser(module: str, doc: str, config: str | None = None, worker_niceness: bool = False
               ) -> argparse.ArgumentParser:
    """The options the benchmarks share: --config (when ``config`` is its default), --set and, for
    those that start Ray themselves, --worker-niceness."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if config:
        parser.add_argument("--config", default=config)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable)")
    if worker_niceness:
        parser.add_argument("--worker-niceness", type=int, default=0,
                            help="niceness of Ray worker processes (Ray's default: 15; the driver runs at 0)")
    return parser


def command_line(module: str) -> str:
    """The exact command that reproduces this run."""
    args = shlex.join(sys.argv[1:])
    return f"uv run python -m {module}" + (f" {args}" if args else "")


def machine() -> dict:
    import ray
    import torch

    info = {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return info


def memory_ratios(small: dict, large: dict) -> dict[str, float | None]:
    """Peak RSS, private RSS and object store of the larger run over the smaller (None: nothing used)."""
    return {key: large[key] / small[key] if small[key] else None
            for key in ("peak_rss", "peak_rss_private", "peak_object_store")}


def print_memory_ratios(small: dict, large: dict, small_name: str, large_name: str, target: float) -> None:
    """One line per peak: both sizes and their ratio against ``target``."""
    ratios = memory_ratios(small, large)
    for key, label in [("peak_rss", "RSS (driver + Ray processes)"), ("peak_rss_private", "RSS minus shared"),
                       ("peak_object_store", "object store used")]:
        r = ratios[key]
        print(f"  peak {label}: {small[key] / 2**20:,.0f} MiB at {small_name}, {large[key] / 2**20:,.0f} MiB "
              f"at {large_name} -> ratio {'n/a' if r is None else f'{r:.3f}'} (target <= {target})")


def _result_text(name: str, payload: dict, module: str) -> str:
    payload = {
        "benchmark": name,
        "command": command_line(module),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        **payload,
    }
    return json.dumps(payload, indent=2, default=float)


def write_result(name: str, payload: dict, module: str) -> Path:
    """bench/results/<name>.json (latest) and bench/results/history/<name>-<time>.json; removes the
    run's <name>.partial.json."""
    text = _result_text(name, payload, module)
    (RESULTS / "history").mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(text)
    (RESULTS / "history" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(text)
    (RESULTS / f"{name}.partial.json").unlink(missing_ok=True)
    return path


def write_partial(name: str, payload: dict, module: str) -> Path:
    """bench/results/<name>.partial.json: a long run's results so far, replaced whole each time."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.partial.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(_result_text(name, payload, module))
    tmp.replace(path)
    return path


def start_ray(num_cpus: int = 8, worker_niceness: int | None = None, runtime_env: dict | None = None) -> None:
    """A private local Ray (``address="local"``: never join another engineer's cluster), its
    processes set up as a run's (``process_setup.setup_process``).

    ``worker_niceness``: Ray starts worker processes at niceness 15 by default (raylet config
    ``worker_niceness``), below the driver's 0; on a CPU-contended machine that alone slows the actor
    pool against an in-process loop in the driver. Benchmarks comparing the two pass 0.
    ``runtime_env``: instead of the run's worker set-up (``process_setup.WORKER_SETUP``).
    """
    import ray

    from stablerep_ray.process_setup import WORKER_SETUP, setup_process

    setup_process()  # as a run's driver and workers set themselves up
    if worker_niceness is not None:
        os.environ["RAY_worker_niceness"] = str(worker_niceness)  # noqa: SIM112 - Ray's own spelling
    for attempt in range(3):
        if ray.is_initialized():
            break
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                     runtime_env=runtime_env or WORKER_SETUP)
        except Exception as err:  # noqa: BLE001 - Ray gives the raylet 30 s to register; a loaded box misses it
            if "timed out during startup" not in str(err) or attempt == 2:
                raise
            print(f"ray.init timed out (load average {os.getloadavg()[0]:.1f}); retrying", flush=True)
            ray.shutdown()
            time.sleep(5)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # progress-bar refreshes cost CPU on a 2-core machine
    ctx.wait_for_min_actors_s = 600


def load(config_path: str, overrides: list[str] | None = None):
    """load_config, building the offline tiny SD pipeline first if the config points at it."""
    from stablerep_ray.config import load_config

    config = load_config(config_path, overrides or [])
    ensure_tiny_pipeline(config)
    return config


def ensure_tiny_pipeline(config) -> None:
    gen = config.generator
    if gen.backend != "diffusers":
        return
    path = Path(gen.model)
    if not (path / "model_index.json").is_file() and gen.model.rstrip("/").endswith("tiny-sd"):
        from stablerep_ray.tools.tiny_pipeline import make_tiny_pipeline

        print(f"building the tiny offline pipeline: stablerep-ray make-tiny-pipeline {gen.model}")
        make_tiny_pipeline(path)


def caption_batches(config, num_batches: int) -> list[dict]:
    """The caption batches the Ray Data stream feeds the actor pool, rebuilt in-process.

    Same rows in the same order as ``build_image_stream``'s blocks: chunk after chunk, pass after pass,
    each chunk cut into ``captions_per_call``-row blocks (the last block of a chunk may be shorter).
    """

    from stablerep_ray.captions.files import caption_rows, plan_chunks, read_chunk

    chunks = plan_chunks(config.captions)
    size = config.generator.captions_per_call
    batches: list[dict] = []
    seq = 0
    while len(batches) < num_batches:
        ids, texts, _ = read_chunk(config.captions, chunks[seq % len(chunks)])
        for start in range(0, len(ids), size):
            stop = min(start + size, len(ids))
            batches.append(caption_rows(seq, ids[start:stop], texts[start:stop]))
            if len(batches) == num_batches:
                break
        seq += 1
    return batches


def steps_for_captions(config, captions: int) -> int:
    """train.steps that makes build_image_stream's caption source at least ``captions`` long."""
    t = config.train
    per_step = max(1, t.batch_size // config.group_size // config.stream.reuse)
    return max(t.steps, -(-captions // per_step) + 1)


def read_scalars(tensorboard_dir: str | Path) -> dict[str, list[tuple[int, float, float]]]:
    """{tag: [(step, value, wall_time), ...]} from the TensorBoard event files in a directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    out = {tag: [(e.step, e.value, e.wall_time) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    for tag in acc.Tags().get("images", []):
        out[f"image:{tag}"] = [(e.step, 0.0, e.wall_time) for e in acc.Images(tag)]
    return out


def fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"


def ray_processes() -> list:
    """psutil processes of this driver's own Ray session (children of the driver, recursively)."""
    import psutil

    return psutil.Process().children(recursive=True)


def cpu_seconds(processes) -> float:
    total = 0.0
    for proc in processes:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except Exception:  # exited meanwhile
            pass
    return total


class ProcessCpu(threading.Thread):
    """Cumulative CPU seconds of this session's Ray processes whose title holds ``fragment``, sampled
    against time.time() every ``interval`` seconds."""

    def __init__(self, fragment: str, interval: float = 1.0):
        super().__init__(daemon=True)
        self.fragment, self.interval, self.samples, self.halt = fragment, interval, [], threading.Event()
        self.seen: dict[int, float] = {}

    def run(self) -> None:
        while not self.halt.is_set():
            for proc in ray_processes():
                if self.fragment in title(proc):
                    self.seen[proc.pid] = cpu_seconds([proc]) or self.seen.get(proc.pid, 0.0)
            self.samples.append((time.time(), sum(self.seen.values())))
            self.halt.wait(self.interval)

    def stop(self) -> None:
        self.halt.set()
        self.join()

    def between(self, t0: float, t1: float) -> float:
        import numpy as np

        times, totals = zip(*self.samples)
        return float(np.interp(t1, times, totals) - np.interp(t0, times, totals))


def title(proc) -> str:
    try:
        cmd = proc.cmdline()
        return cmd[0] if cmd else proc.name()
    except Exception:
        return ""
