"""Does the pipeline *learn*, and does StableRep's multi-positive loss beat SimCLR at equal budget?

    uv run python -m bench.learning                       # 3 seeds x {stablerep, simclr} + random init
    uv run python -m bench.learning --seeds 0 1 2 3 4 --steps 150 --attributes color shape
    uv run python -m bench.learning --objectives synclr stablerep simclr \
        --objective-config synclr=configs/synclr-quickstart.yaml --budget time

Every run goes through the real pipeline (``stablerep_ray.training.fit`` on a local Ray: simulator
generator actor pool -> streaming_split -> 2 DDP workers), from ``configs/quickstart.yaml`` with
only the objective, the seed and the run name changed. Equal budget means equal *encoder views per
step* (``train.batch_size``) and equal steps: StableRep sees ``batch_size / m`` captions with ``m``
images each, SimCLR ``batch_size / 2`` captions with one image in two augmented views
(``train.objective: simclr``). The ``random`` row is the same architecture at its initialisation for
the same seed (the weights training starts from), trained for zero steps.

``--objective-config`` starts an objective's runs from its own config (SynCLR's crops, heads and
temperature: configs/synclr-quickstart.yaml extends the quickstart, so the rest is shared).
``--budget time`` gives every objective the trainer time of the first one at ``--steps``: each runs
``steps x (its measured training-step rate / the first one's)`` steps, rates measured here with the
one training step (the planner's ``measure_trainer_rate``) before any run.

Each checkpoint is scored by weighted kNN (k=20, T=0.07, CLS features) on the simulator's held-out
evaluation set (``render_eval_set``: its own seed space, nuisance from the prior, disjoint from every
training image): ``--per-class`` images per class as the memory bank (``split=train``) and as many
as queries (``split=test``). Prints mean and std over seeds per objective and attribute, and writes
``bench/results/learning.json``. The simulator is a development tool: these numbers say nothing
about StableRep on Stable Diffusion images (docs/learning.md).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time

from stablerep_ray.training.objectives import OBJECTIVES

from . import common  # also sets RAY_ENABLE_UV_RUN_RUNTIME_ENV=0 before ray is imported

ROOT, RESULTS = common.ROOT, common.RESULTS
MODULE = "bench.learning"


def knn_scorer(attributes: list[str], per_class: int, size: int, image_size: int, k: int = 20,
               temperature: float = 0.07, world: str = "default"):
    """``score(model) -> {attribute: kNN top-1}`` on the simulator's held-out sets of ``world``
    (rendered once); ``score(None)`` scores the raw pixels of the views the model would see
    (centred on the bank's mean, cosine), the baseline a learned encoder must beat."""
    import torch

    from stablerep_ray.augment import eval_transform
    from stablerep_ray.evaluation import extract_features, knn_accuracy
    from stablerep_ray.tools.simulator import render_eval_set

    sets = {}
    for attr in attributes:
        bank, bank_labels, names = render_eval_set(attr, per_class, size, seed=0, split="train", world=world)
        query, query_labels, _ = render_eval_set(attr, per_class, size, seed=0, split="test", world=world)
        sets[attr] = (bank, bank_labels, query, query_labels, len(names))

    def pixels(bank, query):
        fb, fq = (eval_transform(x, image_size).flatten(1) for x in (bank, query))
        mean = fb.mean(0)
        return (torch.nn.functional.normalize(f - mean, dim=1) for f in (fb, fq))

    def score(model) -> dict[str, float]:
        out = {}
        for attr, (bank, bank_labels, query, query_labels, num_classes) in sets.items():
            if model is None:
                fb, fq = pixels(bank, query)
            else:
                fb, fq = (extract_features(model, x, image_size) for x in (bank, query))
            out[attr] = knn_accuracy(fb, bank_labels, fq, query_labels, k, temperature, num_classes)
        return out

    return score


def run_config(base, objective: str, seed: int, steps: int, output_dir: str):
    from stablerep_ray.config import from_dict

    data = base.model_dump(mode="json")
    data["name"] = f"learning-{objective}-s{seed}-{steps}steps"
    data["output_dir"] = output_dir
    data["train"].update(objective=objective, seed=seed, steps=steps, max_failures=0,
                         checkpoint_every=steps, image_grid_every=0)
    data["generator"]["seed"] = seed
    data["eval"]["data"] = ""  # scored after training, on the same sets for every run
    return from_dict(data)


def summarise(values: list[float]) -> dict[str, float]:
    import numpy as np

    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
            "min": float(arr.min()), "max": float(arr.max()), "n": int(len(arr))}


def main(argv: list[str] | None = None) -> int:
    p = common.arg_parser(MODULE, __doc__, config="configs/quickstart.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=0, help="steps per run (0: the config's train.steps)")
    p.add_argument("--objectives", nargs="+", default=["stablerep", "simclr"],
                   choices=sorted(OBJECTIVES))
    p.add_argument("--attributes", nargs="+", default=None,
                   help="simulator attributes to score (default: the config's eval attribute)")
    p.add_argument("--per-class", type=int, default=100, help="held-out images per class (bank and queries each)")
    p.add_argument("--objective-config", nargs="+", default=[], metavar="OBJECTIVE=CONFIG",
                   help="the config an objective's runs start from (default: --config)")
    p.add_argument("--budget", choices=["images", "time"], default="images",
                   help="equal images seen (equal steps) or equal trainer time (steps scaled by measured rates)")
    p.add_argument("--output-dir", default="outputs/bench-learning")
    p.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the local Ray")
    args = p.parse_args(argv)

    import numpy as np
    import ray
    import torch

    from stablerep_ray.config import load_config
    from stablerep_ray.models import build_model, load_model
    from stablerep_ray.runtime import configure_data_context
    from stablerep_ray.training.trainer import fit

    base = load_config(args.config, args.overrides)
    steps = args.steps or base.train.steps
    config_of = dict(item.split("=", 1) for item in args.objective_config)
    bases = {o: load_config(config_of.get(o, args.config), [*args.overrides, f"train.objective={o}"])
             for o in args.objectives}
    steps_of = {o: steps for o in args.objectives}
    rates = {}
    if args.budget == "time":
        from stablerep_ray.tools.planner.measure import measure_trainer_rate

        rates = {o: measure_trainer_rate(bases[o], min_seconds=10.0) for o in args.objectives}
        first = args.objectives[0]
        steps_of = {o: max(1, round(steps * rates[o] / rates[first])) for o in args.objectives}
        print("# equal trainer time: " + ", ".join(f"{o} {rates[o]:.0f} inputs/s -> {steps_of[o]} steps"
                                                  for o in args.objectives), flush=True)
    attributes = args.attributes
    if not attributes:
        attributes = [spec.split(":")[1] for spec in base.eval.data_specs if spec.startswith("simulator:")]
        attributes = attributes or ["color"]
    score = knn_scorer(attributes, args.per_class, base.generator.output_size, base.model.image_size,
                       base.eval.knn_k, base.eval.knn_temperature, base.generator.world)
    pixel_acc = score(None)
    command = f"uv run python -m {MODULE}" + (f" {shlex.join(sys.argv[1:])}" if sys.argv[1:] else "")
    print(f"# {command}\n# config {args.config}: {steps} steps x {base.train.batch_size} views, "
          f"m={base.stream.images_per_group}, w={base.generator.guidance_scale}, seeds {args.seeds}, "
          f"kNN on {attributes} ({args.per_class}/class bank + queries, world {base.generator.world})\n"
          "pixels             : " + "  ".join(f"{a} {v:.3f}" for a, v in pixel_acc.items()), flush=True)

    common.start_ray(num_cpus=args.num_cpus)
    configure_data_context()
    ray.data.DataContext.get_current().enable_progress_bars = False
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    runs: list[dict] = []
    start = time.perf_counter()
    # A fresh folder per invocation: a run name that exists would resume its finished checkpoint
    # and score the old model with nothing trained.
    output_dir = f"{args.output_dir}/{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        for seed in args.seeds:
            config = run_config(base, args.objectives[0], seed, steps, output_dir)
            torch.manual_seed(seed)  # the train loop seeds rank 0 with train.seed before build_model
            acc = score(build_model(config).eval())
            runs.append({"objective": "random", "seed": seed, "steps": 0, "knn_top1": acc, "seconds": 0.0})
            print(f"random     seed {seed}: " + "  ".join(f"{a} {v:.3f}" for a, v in acc.items()), flush=True)
            for objective in args.objectives:
                config = run_config(bases[objective], objective, seed, steps_of[objective], output_dir)
                t0 = time.perf_counter()
                result = fit(config)
                seconds = time.perf_counter() - t0
                if result.error is not None or result.checkpoint is None:
                    raise RuntimeError(f"{config.name}: training failed: {result.error}")
                with result.checkpoint.as_directory() as ckpt:
                    model, _ = load_model(ckpt)
                acc = score(model)
                runs.append({"objective": objective, "seed": seed, "steps": steps_of[objective], "knn_top1": acc,
                             "seconds": round(seconds, 1), "loss": result.metrics.get("loss")})
                print(f"{objective:10s} seed {seed}: " + "  ".join(f"{a} {v:.3f}" for a, v in acc.items())
                      + f"  ({seconds:.0f}s, final loss {result.metrics.get('loss', float('nan')):.3f})",
                      flush=True)
    finally:
        ray.shutdown()

    summary: dict[str, dict[str, dict[str, float]]] = {}
    for name in ["random", *args.objectives]:
        rows = [r for r in runs if r["objective"] == name]
        summary[name] = {a: summarise([r["knn_top1"][a] for r in rows]) for a in attributes}

    chance = {a: 1.0 / len(__import__("stablerep_ray.tools.simulator", fromlist=["ATTRIBUTES"]).ATTRIBUTES[a])
              for a in attributes}
    print(f"\nkNN top-1 on the simulator's held-out set, mean +- std over seeds {args.seeds} "
          f"(steps x {base.train.batch_size} encoder views, budget: equal {args.budget})")
    print("| objective | steps | " + " | ".join(f"{a} (chance {chance[a]:.2f})" for a in attributes) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in attributes) + " |")
    print("| raw pixels | 0 | " + " | ".join(f"{pixel_acc[a]:.3f}" for a in attributes) + " |")
    for objective, per_attr in summary.items():
        cells = [f"{s['mean']:.3f} +- {s['std']:.3f}" for s in per_attr.values()]
        print(f"| {objective} | {steps_of.get(objective, 0)} | " + " | ".join(cells) + " |")
    if len(args.objectives) >= 2:  # the first objective against the second, paired by seed
        first, second = args.objectives[:2]
        by_run = {(r["objective"], r["seed"]): r["knn_top1"] for r in runs}
        for a in attributes:
            d = summarise([by_run[first, s][a] - by_run[second, s][a] for s in args.seeds])
            print(f"{first} - {second} on {a}, paired by seed: {d['mean']:+.3f} +- {d['std']:.3f} "
                  f"(min {d['min']:+.3f}, max {d['max']:+.3f})")
    elapsed = time.perf_counter() - start
    print(f"total {elapsed / 60:.1f} min")

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "learning.json"
    payload = {
        "benchmark": "learning",
        "command": command,
        "config": args.config,
        "overrides": args.overrides,
        "steps": steps,
        "budget": args.budget,
        "steps_per_objective": steps_of,
        "trainer_inputs_per_s": rates,
        "batch_size": base.train.batch_size,
        "images_per_group": base.stream.images_per_group,
        "guidance_scale": base.generator.guidance_scale,
        "seeds": args.seeds,
        "attributes": attributes,
        "per_class": args.per_class,
        "chance": chance,
        "world": base.generator.world,
        "pixels": pixel_acc,
        "summary": summary,
        "runs": runs,
        "seconds": round(elapsed, 1),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "ray": ray.__version__, "numpy": np.__version__},
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
