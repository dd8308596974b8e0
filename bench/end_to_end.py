"""End-to-end: images/s the trainer consumes in the full pipeline vs the generator alone.

    uv run python -m bench.end_to_end                                  # tiny diffusers, 24 steps
    uv run python -m bench.end_to_end --config configs/tiny-diffusers.yaml --steps 40

One run, one Ray session: (1) generator-only images/s through Ray Data (bench.generation's method:
``build_image_stream`` consumed by the driver, warm-up excluded), (2) a full training run
(``stablerep_ray.training.fit``) whose rank-0 TensorBoard scalars give the steady-state trained
images/s and ``throughput/data_wait_fraction``, (3) generator-only again (bracketing load drift).

Units: the trainer trains ``batch`` encoder inputs per step but consumes only
``batch / (group_size * reuse)`` NEW captions per step; the generator makes ``images_per_caption``
images per caption. The ratio compares captions/s (equivalently generated images/s):
consumed captions/s in training / generator-only captions/s. Target >= 0.90 when generation is the
bottleneck (data-wait fraction >= 0.2; the benchmark says so when it is not).
"""

from __future__ import annotations

import os
import statistics
import time

from stablerep_ray.captions import count_captions_per_pass

from . import common
from .generation import ray_window

MODULE = "bench.end_to_end"
BOTTLENECK_WAIT = 0.2  # data-wait fraction above which generation is the bottleneck


def steady_state(scalars: dict, batch_size: int, skip: int) -> dict:
    """Trained images/s between the skip-th log point and the last, from event wall times."""
    series = scalars["throughput/images_per_s"]
    waits = scalars["throughput/data_wait_fraction"]
    if len(series) <= skip + 1:
        raise SystemExit(f"only {len(series)} log points; raise --steps or lower --skip-logs")
    (s0, _, w0), (s1, _, w1) = series[skip], series[-1]
    out = {
        "from_step": s0 + 1,
        "to_step": s1,  # a scalar at step s is logged after s steps: the window is steps s0 + 1 to s1
        "seconds": w1 - w0,
        "trained_images_per_s": (s1 - s0) * batch_size / (w1 - w0),
        "data_wait_fraction": statistics.mean(v for _, v, _ in waits[skip + 1:]),
        "interval_images_per_s": [v for _, v, _ in series],
        "interval_data_wait": [v for _, v, _ in waits],
    }
    admitted = scalars.get("stream/groups_admitted")
    if admitted and len(admitted) > skip + 1:
        (_, a0, t0), (_, a1, t1) = admitted[skip], admitted[-1]
        out["admitted_captions_per_s"] = (a1 - a0) / (t1 - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = common.arg_parser(MODULE, __doc__, config="configs/tiny-diffusers.yaml", worker_niceness=True)
    parser.add_argument("--steps", type=int, default=24, help="training steps")
    parser.add_argument("--skip-logs", type=int, default=2, help="log points excluded as warm-up")
    parser.add_argument("--gen-batches", type=int, default=10, help="timed batches per generator-only window")
    args = parser.parse_args(argv)

    from stablerep_ray.training.trainer import fit

    common.start_ray(worker_niceness=args.worker_niceness)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = common.load(args.config, args.overrides)
    run = [f"name=bench-e2e-{base.name}-{stamp}", f"output_dir={common.RESULTS / 'runs'}",
           f"train.steps={args.steps}"]
    config = common.load(args.config, args.overrides + run)
    per_pass = count_captions_per_pass(config.captions)
    g, t = config.generator, config.train
    n, gs, reuse = g.images_per_caption, config.group_size, config.stream.reuse
    print(f"[{args.config}] {g.num_actors} generator actor(s) x {g.num_cpus_per_actor:g} CPU, "
          f"{t.num_workers} trainer workers, batch {t.batch_size}, n={n}, group size {gs}, R={reuse}", flush=True)

    gen_config = common.load(args.config, args.overrides + run + [
        f"train.steps={common.steps_for_captions(config, (args.gen_batches + 8) * g.captions_per_call)}"])
    before = ray_window(gen_config, args.gen_batches, per_pass)
    print(f"  generator only (before): {before['images_per_s']:.2f} images/s", flush=True)
    t0 = time.perf_counter()
    sampler = common.ProcessCpu("GeneratorActor")
    sampler.start()
    result = fit(config, captions_per_pass=per_pass)
    sampler.stop()
    train_s = time.perf_counter() - t0
    if result.error:
        raise SystemExit(f"training failed: {result.error}")
    after = ray_window(gen_config, args.gen_batches, per_pass)
    print(f"  generator only (after):  {after['images_per_s']:.2f} images/s", flush=True)

    scalars = common.read_scalars(config.run_dir / "tensorboard")
    steady = steady_state(scalars, t.batch_size, args.skip_logs)
    gen_images = statistics.mean([before["images_per_s"], after["images_per_s"]])
    gen_captions = gen_images / n
    consumed_captions = steady["trained_images_per_s"] / (gs * reuse)
    ratio = consumed_captions / gen_captions
    # The trainer waiting for images a fifth of its time or more: generation sets the pace.
    bottleneck = steady["data_wait_fraction"] >= BOTTLENECK_WAIT
    # Load-independent view: images per CPU-second of the generator actor, training vs generator-only.
    series = scalars["throughput/images_per_s"]
    w0, w1 = series[args.skip_logs][2], series[-1][2]
    actor_cpu = sampler.between(w0, w1)
    consumed_images = consumed_captions * n * (w1 - w0)
    gen_per_cpu = sum(w["images"] for w in (before, after)) / sum(w["actor_cpu_seconds"] for w in (before, after))
    cpu_ratio = (consumed_images / actor_cpu) / gen_per_cpu if actor_cpu else None
    actor_share = actor_cpu / (w1 - w0)
    summary = {
        "config": args.config,
        "overrides": args.overrides,
        "steps": args.steps,
        "train_wall_s": train_s,
        "generator_only": {"before": before, "after": after, "images_per_s": gen_images,
                           "captions_per_s": gen_captions},
        "training": steady,
        "consumed_captions_per_s": consumed_captions,
        "consumed_generated_images_per_s": consumed_captions * n,
        "ratio": ratio,
        "data_wait_fraction": steady["data_wait_fraction"],
        "generation_is_bottleneck": bottleneck,
        "actor_cpu_share_in_training": actor_share,
        "actor_cpu_efficiency_ratio": cpu_ratio,
        "generator_only_actor_cpu_share": [w["actor_cpu_seconds"] / w["seconds"] for w in (before, after)],
        "load_avg_1m_end": os.getloadavg()[0],
        "target": 0.90,
        "pass": ratio >= 0.90,
        "run_dir": str(config.run_dir),
    }
    path = common.write_result("end_to_end", summary, MODULE)
    print(f"\ncommand: {common.command_line(MODULE)}")
    print(f"  generator only: {gen_images:.2f} images/s = {gen_captions:.3f} captions/s "
          f"(before {before['images_per_s']:.2f}, after {after['images_per_s']:.2f})")
    print(f"  training, steps {steady['from_step']}-{steady['to_step']}: {steady['trained_images_per_s']:.2f} "
          f"images/s trained = {consumed_captions:.3f} new captions/s = {consumed_captions * n:.2f} "
          f"generated images/s consumed"
          + (f" (stream/groups_admitted: {steady['admitted_captions_per_s']:.3f} captions/s)"
             if "admitted_captions_per_s" in steady else ""))
    print(f"  ratio consumed / generator-only = {ratio:.3f} (target >= 0.90); trainer data-wait fraction "
          f"{steady['data_wait_fraction']:.2f}"
          + ("" if bottleneck else f"  NOTE: data-wait < {BOTTLENECK_WAIT}, generation is not clearly the bottleneck"))
    if cpu_ratio is not None:
        print(f"  generated images per actor CPU-second, training / generator-only = {cpu_ratio:.3f}; the actor "
              f"got {actor_share:.0%} of a CPU during training vs "
              f"{', '.join(format(x, '.0%') for x in summary['generator_only_actor_cpu_share'])} generator-only "
              f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
