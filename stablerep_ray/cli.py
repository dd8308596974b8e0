"""``stablerep-ray``: the command line. Thin: parse, validate, hand over to the library."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import Config, ConfigError, load_config


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML experiment file (see configs/)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.steps=100 (repeatable)",
    )
    parser.add_argument("--output-dir", help="override output_dir")


def load_from_args(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if getattr(args, "output_dir", None):
        overrides.append(f"output_dir={args.output_dir}")
    return load_config(args.config, overrides)


def preflight(config: Config) -> int:
    """Every check that needs no cluster, before Ray starts or any actor is reserved.

    Returns the number of captions seen in one pass (a lower bound for large sources)."""
    from .captions import inspect_captions
    from .generation import generator_class
    from .runtime import check_local_fit
    from .storage import check_writable

    check_writable(config.output_dir, "output_dir", remote=False)
    if config.cluster.storage_path:
        check_writable(config.cluster.storage_path, "cluster.storage_path")
    stats = inspect_captions(config.captions)
    more = "" if stats.complete else "+ (first rows checked)"
    print(f"captions: {stats.captions}{more} from {config.captions.source}"
          + (f", {stats.blanks} blank rows skipped" if stats.blanks else ""))
    generator_class(config.generator).preflight(config.generator)
    if config.eval.data:
        from .evaluation import check_data_spec

        check_data_spec(config.eval.data)
    check_local_fit(config)
    warn_if_unbalanced(config)
    return stats.captions


def warn_if_unbalanced(config: Config) -> None:
    """Say so when the generator/trainer split or the generator call size (by measured or estimated
    rates) wastes throughput."""
    from .tools.planner import check_balance, check_call_length, per_unit_rates, rates_for

    rates = rates_for(config)
    if not rates:
        return
    actor_rate, worker_rate = per_unit_rates(config, rates)
    for warning in (check_balance(config, actor_rate, worker_rate), check_call_length(config, actor_rate)):
        if warning:
            print(f"warning: {warning}", file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> int:
    config = load_from_args(args)  # before the heavy imports: a bad config is refused in a blink
    captions_per_pass = preflight(config)
    from .runtime import init_ray
    from .training.optim import describe_lr
    from .training.trainer import fit

    t = config.train
    print(f"training: {t.steps} steps x {t.batch_size} images ({config.captions_per_worker_step} captions x "
          f"{config.group_size} per worker step), objective {t.objective}, {describe_lr(config)}")
    init_ray(config)
    result = fit(config, max_steps=args.max_steps, captions_per_pass=captions_per_pass)
    print(f"checkpoints: {result.checkpoint.path if result.checkpoint else 'none'}")
    print(f"tensorboard: tensorboard --logdir {config.run_dir / 'tensorboard'}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    config = load_from_args(args)
    captions_per_pass = preflight(config)
    from .sweep import run_sweep

    run_sweep(config, resume=args.resume, captions_per_pass=captions_per_pass)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .tools.planner import plan

    print(plan(load_from_args(args), gpus=args.gpus, measure=args.measure))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import evaluate

    results = evaluate(args.checkpoint, args.data, method=args.method, output=args.output)
    for key, value in results.get("metrics", {}).items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    return 0


def cmd_make_tiny_pipeline(args: argparse.Namespace) -> int:
    from .tools.tiny_pipeline import make_tiny_pipeline

    print(f"saved a tiny random Stable Diffusion pipeline to {make_tiny_pipeline(args.directory, args.seed)}")
    return 0


def cmd_make_captions(args: argparse.Namespace) -> int:
    from .tools.simulator import make_captions

    path = Path(args.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(make_captions(args.num, args.seed)) + "\n")
    print(f"wrote {args.num} simulator captions to {path}")
    return 0


def cmd_config_reference(args: argparse.Namespace) -> int:
    from .config import reference_markdown

    print(reference_markdown())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stablerep-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="generate images on an actor pool and train on the stream")
    _add_config_args(p)
    p.add_argument("--max-steps", type=int, help="stop after this step (the lr schedule keeps train.steps)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tune", help="Ray Tune sweep (guidance scale x images per caption, ...)")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="finish an interrupted sweep")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("plan", help="split GPUs between generator actors and trainer workers")
    _add_config_args(p)
    p.add_argument("--gpus", type=int, required=True, help="GPUs available to the run")
    p.add_argument("--measure", action="store_true", help="measure throughput here instead of using the table")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("eval", help="kNN / linear-probe evaluation of a checkpoint")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (holds model.pt)")
    p.add_argument("--data", required=True, help="TRAIN[:TEST]: ImageFolder, parquet, or simulator:<attr>")
    p.add_argument("--method", choices=["knn", "linear", "both"], default="knn")
    p.add_argument("--output", help="results directory (default: CHECKPOINT/eval)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("make-tiny-pipeline", help="save a tiny random SD pipeline for offline use")
    p.add_argument("directory")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_tiny_pipeline)

    p = sub.add_parser("make-captions", help="write simulator captions (composable attributes)")
    p.add_argument("path")
    p.add_argument("--num", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_captions)

    p = sub.add_parser("config-reference", help="print every config key with default and meaning")
    p.set_defaults(func=cmd_config_reference)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
