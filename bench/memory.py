"""Memory over run length: peaks at N and 10N training steps should be the same (bounded stream).

    uv run python -m bench.memory                       # quickstart, N = 80 -> 80 and 800 steps (~8 min)
    uv run python -m bench.memory --steps 20 --factor 10
    uv run python -m bench.memory --synth              # captions written as the run goes (captions.synth)

Both runs are the same 10N-step run (train.steps = 10N: the same stream and learning-rate schedule);
the first is stopped after N steps (``--max-steps``). N must cover the stream's fill-up: a generator
faster than the trainer runs ahead until Ray Data's backpressure holds it, which takes ~50 quickstart
steps. Each run is a separate driver process with its own private Ray session (so idle workers of the
first run do not count in the second) and a fresh run name (no resume). A sampler thread records,
every --interval seconds:
* resident memory: RSS summed over the driver and every process of its Ray session (raylet, GCS,
  generator actors, reader tasks, Train controller and workers), and the same minus shared pages
  (RSS counts the object store's shared-memory pages in every process that maps them);
* object store: bytes used in plasma (raylet FormatGlobalMemoryInfo: object_store_bytes_used).
``--synth`` runs configs/synclr-captions-quickstart.yaml instead: the caption-synthesis stage (template
backend) in front of the generators, so the stream has no end and no file behind it.
Prints peak(10N) / peak(N) for each (target <= 1.1). The stream's object-store budget is
``stream.object_store_mb`` (auto by default; try others with ``--set stream.object_store_mb=512``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from stablerep_ray.captions import count_captions_per_pass

from . import common

MODULE = "bench.memory"
SYNTH_CONFIG = "configs/synclr-captions-quickstart.yaml"


class Sampler(threading.Thread):
    def __init__(self, interval: float):
        super().__init__(daemon=True)
        import psutil
        import ray
        from ray._private.internal_api import get_state_from_address

        self.interval = interval
        self.driver = psutil.Process()
        self.state = get_state_from_address(ray.get_runtime_context().gcs_address)
        self.samples: list[dict] = []
        self.halt = threading.Event()
        self.t0 = time.perf_counter()

    def sample(self) -> dict:
        from ray._private.internal_api import get_memory_info_reply

        rss = private = 0
        procs = 0
        for proc in [self.driver, *self.driver.children(recursive=True)]:
            try:
                info = proc.memory_info()
            except Exception:  # exited meanwhile
                continue
            rss += info.rss
            private += info.rss - getattr(info, "shared", 0)
            procs += 1
        try:
            store = get_memory_info_reply(self.state, timeout_seconds=5).store_stats.object_store_bytes_used
        except Exception:  # noqa: BLE001 - raylet busy: skip this sample's store figure
            store = None
        return {"t": time.perf_counter() - self.t0, "rss": rss, "rss_private": private,
                "object_store": store, "processes": procs}

    def run(self) -> None:
        while not self.halt.is_set():
            self.samples.append(self.sample())
            self.halt.wait(self.interval)

    def stop(self) -> dict:
        self.halt.set()
        self.join()
        peak = lambda key: max((s[key] for s in self.samples if s[key] is not None), default=0)  # noqa: E731
        return {
            "samples": len(self.samples),
            "peak_rss": peak("rss"),
            "peak_rss_private": peak("rss_private"),
            "peak_object_store": peak("object_store"),
            "peak_processes": peak("processes"),
            "timeline": self.samples[:: max(1, len(self.samples) // 200)],
        }


def one_run(path: str, overrides: list[str], steps: int, total_steps: int, interval: float, niceness: int) -> dict:
    import ray

    from stablerep_ray.training.trainer import fit

    common.start_ray(worker_niceness=niceness)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    config = common.load(path, overrides + [
        f"name=bench-mem-{steps}-{stamp}", f"output_dir={common.RESULTS / 'runs'}", f"train.steps={total_steps}"])
    per_pass = count_captions_per_pass(config.captions)
    sampler = Sampler(interval)
    sampler.start()
    t0 = time.perf_counter()
    result = fit(config, max_steps=steps, captions_per_pass=per_pass)
    wall = time.perf_counter() - t0
    stats = sampler.stop()
    ray.shutdown()
    if result.error:
        raise SystemExit(f"training failed: {result.error}")
    scalars = common.read_scalars(config.run_dir / "tensorboard")
    buffer = scalars.get("stream/buffer_mb", [])
    stats.update({"steps": steps, "wall_s": wall, "peak_replay_buffer_mb": max((v for _, v, _ in buffer), default=0)})
    print(f"  {steps:5d} steps ({wall:.0f} s): peak RSS {stats['peak_rss'] / 2**30:.2f} GiB "
          f"(private {stats['peak_rss_private'] / 2**30:.2f} GiB, {stats['peak_processes']} processes), "
          f"object store {stats['peak_object_store'] / 2**20:.1f} MiB, replay buffer (rank 0) "
          f"{stats['peak_replay_buffer_mb']:.1f} MiB", flush=True)
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = common.arg_parser(MODULE, __doc__, config="configs/quickstart.yaml", worker_niceness=True)
    parser.add_argument("--steps", type=int, default=80, help="N")
    parser.add_argument("--factor", type=int, default=10, help="the long run has factor x N steps")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("--synth", action="store_true", help=f"captions written as the run goes ({SYNTH_CONFIG})")
    parser.add_argument("--single", type=int, help=argparse.SUPPRESS)  # internal: one run of this many steps
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.synth:
        args.config = SYNTH_CONFIG

    if args.single:
        stats = one_run(args.config, args.overrides, args.single, args.steps * args.factor, args.interval,
                        args.worker_niceness)
        Path(args.out).write_text(json.dumps(stats))
        return 0

    def run(steps: int) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "stats.json"
            cmd = [sys.executable, "-m", MODULE, "--config", args.config, "--single", str(steps), "--out", str(out),
                   "--steps", str(args.steps), "--factor", str(args.factor),
                   "--interval", str(args.interval), "--worker-niceness", str(args.worker_niceness)]
            for item in args.overrides:
                cmd += ["--set", item]
            subprocess.run(cmd, check=True, cwd=common.ROOT)
            return json.loads(out.read_text())

    print(f"[{args.config}] N = {args.steps} and {args.factor}N = {args.steps * args.factor} steps", flush=True)
    short = run(args.steps)
    long = run(args.steps * args.factor)
    ratios = common.memory_ratios(short, long)
    summary = {"config": args.config, "overrides": args.overrides, "N": args.steps, "factor": args.factor,
               "short": short, "long": long, "ratios": ratios, "target": 1.1,
               "pass": all(r is not None and r <= 1.1 for r in (ratios["peak_rss"], ratios["peak_object_store"]))}
    path = common.write_result("memory-synth" if args.synth else "memory", summary, MODULE)
    print(f"\ncommand: {common.command_line(MODULE)}")
    common.print_memory_ratios(short, long, "N", f"{args.factor}N", 1.1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
