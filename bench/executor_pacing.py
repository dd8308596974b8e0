"""Ray Data's scheduling loop paced or not, when the trainer holds the stream back.

    uv run python -m bench.executor_pacing                  # spatial quickstart, 150 steps, 2 rounds
    uv run python -m bench.executor_pacing --config configs/quickstart.yaml --rounds 1

When generation outpaces training, the generator's finished output waits unread, ``ray.wait`` in Ray
Data's executor returns at once, and the executor (in the split coordinator actor that feeds Train)
re-plans in a tight loop. A run sets every process up with ``process_setup.setup_process``, which paces that
loop (``process_setup.MIN_LOOP_PERIOD_S``). Each round trains the config twice through ``training.fit``,
each time on a fresh local Ray: paced (as ``train`` runs) and unpaced (Ray Data as shipped: the worker
set-up hook without the pacing), in alternating order. Reported per arm, over the log points after
``--skip-logs``: trained images/s from the run's TensorBoard scalars, and the CPU seconds per second
of the split coordinator, the trainer workers and the generator actor (psutil, sampled every second).
Online evaluation is off, so the window holds training steps only.
"""

from __future__ import annotations

import statistics
import sys
import time

from . import common
from .end_to_end import steady_state

MODULE = "bench.executor_pacing"
UNPACED = {"worker_process_setup_hook": "stablerep_ray.process_setup.quiet_ray_logs"}
PROCESSES = {"split coordinator": "SplitCoordinator", "trainer workers": "RayTrainWorker",
             "generator": "GeneratorActor"}


def one_arm(args, paced: bool, index: int) -> dict:
    import ray

    from stablerep_ray.runtime import configure_data_context
    from stablerep_ray.training.trainer import fit

    arm = "paced" if paced else "unpaced"
    common.start_ray(runtime_env=None if paced else UNPACED)
    configure_data_context()
    ray.data.DataContext.get_current().enable_progress_bars = False
    config = common.load(args.config, args.overrides + [
        f"name=bench-pacing-{arm}-{index}-{time.strftime('%H%M%S')}", f"output_dir={common.RESULTS / 'runs'}",
        f"train.steps={args.steps}", "eval.every=0", "train.image_grid_every=0",
        f"train.checkpoint_every={args.steps}", "train.max_failures=0"])
    samplers = {name: common.ProcessCpu(fragment) for name, fragment in PROCESSES.items()}
    for sampler in samplers.values():
        sampler.start()
    try:
        result = fit(config)
    finally:
        for sampler in samplers.values():
            sampler.stop()
        ray.shutdown()
    if result.error:
        raise SystemExit(f"{arm}: training failed: {result.error}")
    scalars = common.read_scalars(config.run_dir / "tensorboard")
    steady = steady_state(scalars, config.train.batch_size, args.skip_logs)
    series = scalars["throughput/images_per_s"]
    w0, w1 = series[args.skip_logs][2], series[-1][2]
    cpu = {name: s.between(w0, w1) / (w1 - w0) for name, s in samplers.items()}
    row = {"arm": arm, "round": index, "trained_images_per_s": steady["trained_images_per_s"],
           "steps": [steady["from_step"], steady["to_step"]], "data_wait_fraction": steady["data_wait_fraction"],
           "cpu_s_per_s": cpu}
    print(f"round {index} {arm:8s}: {row['trained_images_per_s']:6.1f} images/s trained (steps "
          f"{steady['from_step']}-{steady['to_step']}, data-wait {steady['data_wait_fraction']:.0%}); CPU s/s "
          + ", ".join(f"{name} {v:.2f}" for name, v in cpu.items()), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = common.arg_parser(MODULE, __doc__, config="configs/spatial-quickstart.yaml")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--skip-logs", type=int, default=4, help="log points excluded as warm-up")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)

    rows = []
    for index in range(args.rounds):
        order = (True, False) if index % 2 == 0 else (False, True)
        rows += [one_arm(args, paced, index) for paced in order]

    def arm(name: str) -> list[dict]:
        return [r for r in rows if r["arm"] == name]

    ratios = [p["trained_images_per_s"] / u["trained_images_per_s"] for p, u in zip(arm("paced"), arm("unpaced"))]
    cpu = {name: {a: statistics.mean(r["cpu_s_per_s"][name] for r in arm(a)) for a in ("paced", "unpaced")}
           for name in PROCESSES}
    summary = {"config": args.config, "overrides": args.overrides, "steps": args.steps, "rows": rows,
               "ratio_per_round": ratios, "ratio_median": statistics.median(ratios), "cpu_s_per_s": cpu}
    path = common.write_result("executor_pacing", summary, MODULE)
    print(f"\ncommand: {common.command_line(MODULE)}")
    print(f"trained images/s, paced / unpaced per round: {', '.join(f'{r:.2f}' for r in ratios)} "
          f"(median {summary['ratio_median']:.2f})")
    print("CPU seconds per second, paced vs unpaced: "
          + "; ".join(f"{name} {v['paced']:.2f} vs {v['unpaced']:.2f}" for name, v in cpu.items()))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
