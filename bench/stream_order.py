"""What keeping the stream's order costs a pool of several generator actors.

    uv run python -m bench.stream_order                        # quickstart (simulator), 2 actors
    uv run python -m bench.stream_order --actors 4 --set generator.captions_per_call=128

``build_image_stream`` keeps its order by default (``stream.keep_order``): generator calls run in
parallel, but a finished call's images wait for the calls before it, so an actor slower than the
others holds the rest back until Ray Data's object-store budget for the stream stops new calls. This
reads the same stream (bench.generation's driver-side window: ``build_image_stream`` read with
``iter_batches``, warm-up excluded) with ``stream.keep_order`` on and off, alternating: unordered,
ordered, unordered, ...; each ordered window is compared with the mean of the unordered ones on
either side of it (the machine's load drifts between windows), and the result is the median over
rounds (and the pooled ratio).
Target: ordered / unordered images/s >= 0.95.

``--kill``: the same two streams, each losing one generator actor (SIGKILL, as a preempted node) a
third of the way through a window. Ray Data restarts the actor and retries its call there; the
longest wait between two batches says whether the rest of the pool kept the stream going meanwhile.
"""

from __future__ import annotations

import os
import signal
import statistics
import time

from stablerep_ray.captions import count_captions_per_pass

from . import common
from .generation import DEFAULT_BATCHES, generator_actor_procs, images_in, ray_window, stream_batches, wait_for_shutdown

MODULE = "bench.stream_order"


def kill_window(config, num_batches: int, per_pass: int) -> dict:
    """The stream read as in ``ray_window``, one generator actor killed after a third of the batches:
    images/s over the window and the longest wait for a batch."""
    iterator = stream_batches(config, per_pass)
    next(iterator)  # warm-up: actors start, first calls
    start = last = time.perf_counter()
    images, gaps, killed_at = 0, [], None
    for count, batch in enumerate(iterator, 1):
        now = time.perf_counter()
        gaps.append(now - last)
        last, images = now, images + images_in(batch)
        if count == num_batches // 3:
            os.kill(generator_actor_procs()[0].pid, signal.SIGKILL)
            killed_at = now - start
        if count >= num_batches:
            break
    del iterator
    wait_for_shutdown()
    after = gaps[num_batches // 3:]
    return {"images": images, "seconds": last - start, "images_per_s": images / (last - start),
            "killed_at_s": killed_at, "longest_wait_s": max(after), "median_wait_s": statistics.median(gaps),
            "load_avg_1m": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    parser = common.arg_parser(MODULE, __doc__, config="configs/quickstart.yaml", worker_niceness=True)
    parser.add_argument("--actors", type=int, default=2, help="generator actors in the pool")
    parser.add_argument("--rounds", type=int, default=3, help="ordered windows (each between two unordered)")
    parser.add_argument("--batches", type=int, help="timed batches per window (default: bench.generation's)")
    parser.add_argument("--kill", action="store_true", help="also: one actor killed in an ordered and an unordered "
                                                            "window")
    args = parser.parse_args(argv)

    common.start_ray(worker_niceness=args.worker_niceness)
    overrides = args.overrides + [f"generator.num_actors={args.actors}", "generator.num_gpus_per_actor=0"]
    config = common.load(args.config, overrides)
    per_pass = count_captions_per_pass(config.captions)
    k = args.batches or DEFAULT_BATCHES[config.generator.backend] * args.actors
    needed = (k + 8 * args.actors) * config.generator.captions_per_call
    overrides.append(f"train.steps={common.steps_for_captions(config, needed)}")
    configs = {order: common.load(args.config, overrides + [f"stream.keep_order={order}"]) for order in (True, False)}
    g = config.generator
    print(f"[{args.config}] {g.num_actors} actors x {g.num_cpus_per_actor:g} CPU, captions_per_call "
          f"{g.captions_per_call} x {g.images_per_caption} images, {k} timed batches per window", flush=True)

    def window(ordered: bool) -> dict:
        w = ray_window(configs[ordered], k, per_pass)
        print(f"  {'ordered  ' if ordered else 'unordered'}: {w['images_per_s']:8.1f} images/s "
              f"(warm-up {w['warmup_s']:.1f} s)", flush=True)
        return w

    unordered, ordered, ratios = [window(False)], [], []
    for _ in range(args.rounds):
        ordered.append(window(True))
        unordered.append(window(False))
        ratios.append(ordered[-1]["images_per_s"] / statistics.mean(w["images_per_s"] for w in unordered[-2:]))
    rate = lambda ws: sum(w["images"] for w in ws) / sum(w["seconds"] for w in ws)  # noqa: E731
    ratio, pooled = statistics.median(ratios), rate(ordered) / rate(unordered)
    killed = {}
    for label, order in (("unordered", False), ("ordered", True)) if args.kill else ():
        killed[label] = w = kill_window(configs[order], k, per_pass)
        print(f"  {label:9} with one actor killed at {w['killed_at_s']:.1f} s: {w['images_per_s']:8.1f} images/s, "
              f"longest wait for a batch {w['longest_wait_s']:.1f} s (median {w['median_wait_s']:.2f} s)", flush=True)
    summary = {"config": args.config, "overrides": overrides, "actors": args.actors, "batches_per_window": k,
               "ordered_windows": ordered, "unordered_windows": unordered, "round_ratios": ratios,
               "ordered_images_per_s": rate(ordered), "unordered_images_per_s": rate(unordered),
               "ratio": ratio, "pooled_ratio": pooled, "target": 0.95, "pass": ratio >= 0.95, "killed": killed}
    path = common.write_result("stream_order", summary, MODULE)
    print(f"\ncommand: {common.command_line(MODULE)}")
    print(f"  ordered {rate(ordered):.1f} vs unordered {rate(unordered):.1f} images/s: ratio median {ratio:.3f} "
          f"(rounds {', '.join(f'{x:.3f}' for x in ratios)}), pooled {pooled:.3f} (target >= 0.95)")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
