"""Start-up latency: from the command's start to the first training step, for the quickstart.

    uv run python -m bench.startup                          # 2 runs of the quickstart
    uv run python -m bench.startup --repeats 3 --config configs/quickstart.yaml

Runs the user's command, ``uv run stablerep-ray train CONFIG --max-steps 3`` (fresh output
directory, so nothing resumes), as a subprocess; t = 0 just before it is spawned. The first training
step's time is the wall time of rank 0's first TensorBoard event written after step 0 completes (the
``samples/caption_groups`` image); intermediate milestones are the times the matching log lines
reached the pipe. The CLI starts its own local Ray exactly as a user's run does (Ray's default worker
niceness included).
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from . import common

MODULE = "bench.startup"
MILESTONES = [
    ("preflight done (imports, caption check)", re.compile(r"^captions: ")),
    ("Ray started", re.compile(r"Started a local Ray instance")),
    ("Train controller started", re.compile(r"TrainController|Train run|Attempting to start training worker group")),
    ("worker group started", re.compile(r"[Ss]tarted training worker group|Started distributed worker group")),
    ("dataset execution started", re.compile(r"Starting execution of Dataset")),
]


def one_run(config: str, overrides: list[str], max_steps: int, index: int) -> dict:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = common.RESULTS / "runs" / f"startup-{stamp}-{index}"
    name = f"startup-{index}"
    uv = shutil.which("uv")
    cli = [uv, "run", "stablerep-ray"] if uv else [str(Path(sys.executable).with_name("stablerep-ray"))]
    # --verbose: the milestones are Ray's own INFO lines, which the console leaves out by default
    cmd = [*cli, "train", config, "--max-steps", str(max_steps), "--output-dir", str(out), "--set", f"name={name}",
           "--verbose"]
    for item in overrides:
        cmd += ["--set", item]
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=common.ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, bufsize=1)
    lines = []
    for line in proc.stdout:
        lines.append((time.time() - t0, line.rstrip()))
    code = proc.wait()
    total = time.time() - t0
    if code:
        tail = "\n".join(text for _, text in lines[-30:])
        raise SystemExit(f"{' '.join(cmd)} exited with {code}:\n{tail}")
    scalars = common.read_scalars(out / name / "tensorboard")
    first_step = min(w for _, _, w in scalars["image:samples/caption_groups"]) - t0
    first_log = min(w for _, _, w in scalars["throughput/images_per_s"]) - t0
    marks = {}
    for label, pattern in MILESTONES:
        hit = next((t for t, text in lines if pattern.search(text)), None)
        if hit is not None:
            marks[label] = hit
    return {
        "command": " ".join(cmd),
        "first_step_s": first_step,
        "first_scalar_s": first_log,
        "command_total_s": total,
        "milestones_s": marks,
        "log": [(round(t, 2), text) for t, text in lines][:400],
    }


def main(argv: list[str] | None = None) -> int:
    parser = common.arg_parser(MODULE, __doc__, config="configs/quickstart.yaml")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=3)
    args = parser.parse_args(argv)
    if Path("/tmp/ray/ray_current_cluster").exists() and not os.environ.get("BENCH_ALLOW_SHARED_RAY"):
        raise SystemExit("a `ray start` cluster is running on this machine: the CLI would join it instead "
                         "of starting its own, which is not what a user's first run measures. Set "
                         "BENCH_ALLOW_SHARED_RAY=1 to measure anyway.")
    runs = []
    for i in range(args.repeats):
        runs.append(one_run(args.config, args.overrides, args.max_steps, i))
        r = runs[-1]
        marks = ", ".join(f"{k} {v:.1f} s" for k, v in sorted(r["milestones_s"].items(), key=lambda kv: kv[1]))
        print(f"  run {i}: first training step at {r['first_step_s']:.1f} s ({marks}); command "
              f"finished at {r['command_total_s']:.1f} s", flush=True)
    median = statistics.median(r["first_step_s"] for r in runs)
    path = common.write_result("startup", {"config": args.config, "overrides": args.overrides, "runs": runs,
                                           "first_step_s_median": median}, MODULE)
    print(f"\ncommand: {common.command_line(MODULE)}")
    print(f"  time from `{runs[0]['command']}` start to the first training step: median {median:.1f} s "
          f"(runs: {', '.join(format(r['first_step_s'], '.1f') for r in runs)})")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
