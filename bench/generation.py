"""Generator-only throughput: Ray Data actor pool vs the same generator in a plain in-process loop.

    uv run python -m bench.generation                       # simulator quickstart + tiny diffusers
    uv run python -m bench.generation --config configs/tiny-diffusers.yaml --rounds 3

Both sides run the same GeneratorActor class on the same caption batches (same pipeline, same batch
size ``captions_per_call``, one torch thread: the actor gets ``num_cpus_per_actor=1`` so Ray sets
OMP_NUM_THREADS=1, and the in-process loop calls ``torch.set_num_threads(1)``). The Ray side is
``build_image_stream`` consumed by the driver with ``iter_batches``, exactly as a train worker reads it.

Warm-up is excluded on both sides: timing starts once the first batch has arrived. The machine is
shared, so the two sides are interleaved: in-process, Ray, in-process, Ray, ..., in-process; each
Ray window is compared with the mean of the in-process windows on either side of it, and the result
is the median over rounds (plus the pooled ratio). Ray worker processes run at the driver's priority
(``RAY_worker_niceness=0``; Ray's default is 15, see --worker-niceness) so the comparison measures
Ray Data's overhead, not the scheduler's priority. CPU-time ratios are reported too: they depend
much less on how busy the machine is. A last window runs the same class as a plain Ray actor (no Ray
Data) to split the overhead between Ray core and Ray Data.
Ratio target: Ray / in-process images/s >= 0.95.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

from stablerep_ray.captions import count_captions_per_pass

from . import common

MODULE = "bench.generation"
DEFAULT_CONFIGS = ["configs/quickstart.yaml", "configs/tiny-diffusers.yaml"]
# Timed batches per window and backend (after the warm-up batch): a few seconds each.
DEFAULT_BATCHES = {"simulator": 20, "diffusers": 10}


def images_in(batch: dict) -> int:
    return int(np.asarray(batch["num_images"]).sum())


def in_process_window(actor, batches: list[dict]) -> dict:
    """images/s of ``actor(batch)`` over batches[1:] (batches[0] is the warm-up call)."""
    actor(batches[0])
    images = 0
    cpu0, start = time.thread_time(), time.perf_counter()
    for batch in batches[1:]:
        images += images_in(actor(batch))
    elapsed, cpu = time.perf_counter() - start, time.thread_time() - cpu0
    return {"images": images, "seconds": elapsed, "cpu_seconds": cpu, "images_per_s": images / elapsed,
            "load_avg_1m": os.getloadavg()[0]}


def generator_actor_procs() -> list:
    return [p for p in common.ray_processes() if "GeneratorActor" in common.title(p)]


def stream_batches(config, per_pass: int):
    """An iterator over build_image_stream's batches, read as a train worker reads them."""
    from stablerep_ray.generation.stage import build_image_stream

    ds = build_image_stream(config, 0, per_pass)
    return iter(ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=config.stream.prefetch_batches))


def ray_window(config, num_batches: int, per_pass: int) -> dict:
    """images/s of build_image_stream consumed by the driver, from the first batch on."""
    import psutil

    t0 = time.perf_counter()
    images = batches = 0
    iterator = stream_batches(config, per_pass)
    next(iterator)  # warm-up: actor start, pipeline load, first call
    first = time.perf_counter()
    driver = psutil.Process()
    procs = common.ray_processes()
    actors = generator_actor_procs()
    all_cpu0, actor_cpu0, driver_cpu0 = common.cpu_seconds(procs), common.cpu_seconds(actors), time.process_time()
    for batch in iterator:
        images += images_in(batch)
        batches += 1
        if batches >= num_batches:
            break
    end = time.perf_counter()
    procs_end = common.ray_processes()
    # processes that appeared during the window count from their start
    all_cpu = common.cpu_seconds(procs_end) - all_cpu0 + (time.process_time() - driver_cpu0)
    actor_cpu = common.cpu_seconds(actors) - actor_cpu0
    del iterator, driver
    wait_for_shutdown()
    elapsed = end - first
    return {
        "images": images,
        "batches": batches,
        "seconds": elapsed,
        "images_per_s": images / elapsed,
        "warmup_s": first - t0,
        "actor_cpu_seconds": actor_cpu,
        "pipeline_cpu_seconds": all_cpu,
        "actors_found": len(actors),
        "load_avg_1m": os.getloadavg()[0],
    }


def plain_actor_window(config, batches: list[dict], threads: int) -> dict:
    """The same GeneratorActor as a plain Ray actor (no Ray Data): the cost of Ray core alone.

    Two calls in flight (as Ray Data keeps an actor busy); results fetched by the driver.
    """
    import ray

    from stablerep_ray.generation.stage import GeneratorActor

    Remote = ray.remote(num_cpus=config.generator.num_cpus_per_actor)(GeneratorActor)
    actor = Remote.remote(config.generator)
    ray.get(actor.__call__.remote(batches[0]))  # warm-up: start, load, first call
    procs = [p for p in common.ray_processes() if "GeneratorActor" in common.title(p)]
    cpu0, start = common.cpu_seconds(procs), time.perf_counter()
    pending = [actor.__call__.remote(b) for b in batches[1:3]]
    images, nxt = 0, 3
    while pending:
        out = ray.get(pending.pop(0))
        images += images_in(out)
        if nxt < len(batches):
            pending.append(actor.__call__.remote(batches[nxt]))
            nxt += 1
    elapsed = time.perf_counter() - start
    cpu = common.cpu_seconds(procs) - cpu0
    ray.kill(actor)
    wait_for_shutdown()
    return {"images": images, "seconds": elapsed, "images_per_s": images / elapsed, "actor_cpu_seconds": cpu,
            "load_avg_1m": os.getloadavg()[0]}


def wait_for_shutdown(timeout: float = 20.0) -> None:
    """Let the executor stop its actor before the next in-process window starts."""
    import gc

    gc.collect()
    deadline = time.monotonic() + timeout
    while generator_actor_procs() and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(1.0)


def actor_threads(num_cpus: float) -> int:
    """torch.get_num_threads() inside a Ray worker with the generator actor's CPU request."""
    import ray

    @ray.remote(num_cpus=num_cpus)
    def threads() -> int:
        import torch

        return torch.get_num_threads()

    return ray.get(threads.remote())


def run_config(path: str, overrides: list[str], rounds: int, batches_per_window: int | None,
               plain_actor: bool = True) -> dict:
    import torch

    from stablerep_ray.generation.stage import GeneratorActor

    base = common.load(path, overrides)
    k = batches_per_window or DEFAULT_BATCHES[base.generator.backend]
    # One actor, one CPU: the comparison is per actor, and the in-process loop uses one thread.
    forced = ["generator.num_actors=1", "generator.num_cpus_per_actor=1", "generator.num_gpus_per_actor=0"]
    config = common.load(path, overrides + forced)
    per_pass = count_captions_per_pass(config.captions)
    needed = (k + 8) * config.generator.captions_per_call
    config = common.load(path, overrides + forced + [f"train.steps={common.steps_for_captions(config, needed)}"])

    threads = actor_threads(config.generator.num_cpus_per_actor)
    torch.set_num_threads(threads)
    from threadpoolctl import threadpool_limits

    threadpool_limits(threads)  # numpy's BLAS too, like OMP_NUM_THREADS in the actor
    batches = common.caption_batches(config, k + 1)
    g = config.generator
    print(f"[{path}] backend={g.backend} captions_per_call={g.captions_per_call} "
          f"images_per_caption={g.images_per_caption} torch threads={threads} "
          f"{k} timed batches per window, {rounds} rounds", flush=True)

    t0 = time.perf_counter()
    actor = GeneratorActor(g)
    load_s = time.perf_counter() - t0
    local = [in_process_window(actor, batches)]
    print(f"  in-process : {local[-1]['images_per_s']:8.1f} images/s", flush=True)
    remote, ratios, plain = [], [], []
    for _ in range(rounds):
        remote.append(ray_window(config, k, per_pass))
        print(f"  Ray Data   : {remote[-1]['images_per_s']:8.1f} images/s "
              f"(warm-up {remote[-1]['warmup_s']:.1f} s)", flush=True)
        local.append(in_process_window(actor, batches))
        print(f"  in-process : {local[-1]['images_per_s']:8.1f} images/s", flush=True)
        ratios.append(remote[-1]["images_per_s"]
                      / statistics.mean([local[-2]["images_per_s"], local[-1]["images_per_s"]]))
    if plain_actor:
        plain.append(plain_actor_window(config, batches, threads))
        print(f"  plain Ray actor (no Ray Data): {plain[-1]['images_per_s']:8.1f} images/s", flush=True)
        local.append(in_process_window(actor, batches))
        print(f"  in-process : {local[-1]['images_per_s']:8.1f} images/s", flush=True)
    rate = lambda ws, key="seconds": sum(w["images"] for w in ws) / sum(w[key] for w in ws)  # noqa: E731
    pooled = rate(remote) / rate(local)
    actor_cpu = rate(remote, "actor_cpu_seconds") / rate(local, "cpu_seconds")
    pipeline_cpu = rate(remote, "pipeline_cpu_seconds") / rate(local, "cpu_seconds")
    ratio = statistics.median(ratios)
    plain_ratio = (plain[0]["images_per_s"] / statistics.mean([local[-2]["images_per_s"], local[-1]["images_per_s"]])
                   if plain else None)
    plain_cpu = (plain[0]["images"] / plain[0]["actor_cpu_seconds"]) / rate(local, "cpu_seconds") if plain else None
    if plain:
        print(f"  plain Ray actor / in-process: images/s {plain_ratio:.3f}, images per actor CPU-second "
              f"{plain_cpu:.3f}")
    print(f"  ratio Ray / in-process images/s: median {ratio:.3f} (rounds: "
          f"{', '.join(f'{x:.3f}' for x in ratios)}), pooled {pooled:.3f}  (target >= 0.95)")
    print(f"  images per CPU-second, Ray / in-process: actor {actor_cpu:.3f}, whole pipeline "
          f"(driver + reader + actor + raylet) {pipeline_cpu:.3f}", flush=True)
    loads = [w["load_avg_1m"] for w in local + remote]
    print(f"  1-minute load average during the windows: {min(loads):.1f}-{max(loads):.1f} "
          f"on {os.cpu_count()} CPUs", flush=True)
    return {
        "config": path,
        "overrides": overrides,
        "backend": g.backend,
        "captions_per_call": g.captions_per_call,
        "images_per_caption": g.images_per_caption,
        "torch_threads": threads,
        "pipeline_load_s": load_s,
        "in_process_windows": local,
        "ray_windows": remote,
        "in_process_images_per_s": rate(local),
        "ray_images_per_s": rate(remote),
        "round_ratios": ratios,
        "plain_actor_windows": plain,
        "plain_actor_ratio": plain_ratio,
        "plain_actor_cpu_efficiency_ratio": plain_cpu,
        "ratio": ratio,
        "pooled_ratio": pooled,
        "actor_cpu_efficiency_ratio": actor_cpu,
        "pipeline_cpu_efficiency_ratio": pipeline_cpu,
        "target": 0.95,
        "pass": ratio >= 0.95,
    }


def main(argv: list[str] | None = None) -> int:
    parser = common.arg_parser(MODULE, __doc__, worker_niceness=True)
    parser.add_argument("--config", action="append", help=f"config (repeatable; default: {DEFAULT_CONFIGS})")
    parser.add_argument("--rounds", type=int, default=3, help="Ray windows (each between two in-process ones)")
    parser.add_argument("--batches", type=int, help="timed batches per window (default: per backend)")
    parser.add_argument("--no-plain-actor", action="store_true",
                        help="skip the plain Ray actor window (Ray core without Ray Data)")
    args = parser.parse_args(argv)

    common.start_ray(worker_niceness=args.worker_niceness)
    results = [run_config(c, args.overrides, args.rounds, args.batches, not args.no_plain_actor)
               for c in args.config or DEFAULT_CONFIGS]
    path = common.write_result("generation", {"worker_niceness": args.worker_niceness, "results": results}, MODULE)
    print(f"\ncommand: {common.command_line(MODULE)}")
    for r in results:
        print(f"  {r['config']:<30} in-process {r['in_process_images_per_s']:8.1f} img/s  "
              f"Ray Data {r['ray_images_per_s']:8.1f} img/s  ratio {r['ratio']:.3f} "
              f"(pooled {r['pooled_ratio']:.3f}; CPU-time: actor {r['actor_cpu_efficiency_ratio']:.3f}, "
              f"pipeline {r['pipeline_cpu_efficiency_ratio']:.3f})  {'OK' if r['pass'] else 'BELOW TARGET'}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
