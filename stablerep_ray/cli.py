"""``stablerep-ray``: the command line. Thin: parse, validate, hand over to the library."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config import SIMULATOR_WORLDS, SYNTH_SOURCE, Config, ConfigError, load_config
from .tools.tiny_pipeline import FAMILIES


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML experiment file (see configs/)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.steps=100 (repeatable)",
    )
    parser.add_argument("--output-dir", help="override output_dir")
    _add_verbose_arg(parser)


def _add_verbose_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help="also print Ray's own INFO logs and per-operator progress bars")


def load_from_args(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if getattr(args, "output_dir", None):
        overrides.append(f"output_dir={args.output_dir}")
    return load_config(args.config, overrides)


def check_caption_supply_of_one_pass(config: Config, captions: int, steps: int | None = None) -> None:
    """With ``captions.repeat`` off, refuse a run that must run out of captions: its ``steps`` (``--max-steps``,
    capped at ``train.steps`` as the loop does) serve K caption groups a worker step, each group at most
    ``stream.reuse`` times.
    Inside the run the stream would end on a worker, and Ray Train would retry it ``max_failures`` times."""
    if config.captions.repeat:
        return
    steps = min(steps or config.train.steps, config.train.steps)
    served = steps * config.captions_per_worker_step * config.train.num_workers
    need = -(-served // config.stream.reuse)
    if captions < need:
        raise ConfigError(
            f"captions.repeat: false, but {config.captions.source} holds {captions} captions and {steps} steps "
            f"serve {served} caption groups, at most {config.stream.reuse} times each (stream.reuse): at least "
            f"{need} needed; set captions.repeat=true, lower train.steps or raise stream.reuse"
        )


def preflight(config: Config, steps: int | None = None) -> int:
    """Every check that needs no cluster, before Ray starts or any actor is reserved, but the storage's
    (``storage.check_storage``, which comes first). ``steps``: the steps this run trains
    (``--max-steps``), default ``train.steps``.

    Returns the number of captions seen in one pass (a lower bound for large sources)."""
    from .captions import inspect_captions, whole_file_warnings
    from .generation import generator_class
    from .runtime import check_local_fit

    if config.captions.source == SYNTH_SOURCE:
        from .captions.synth.preview import check_synth

        print(check_synth(config.captions.synth))
        captions_per_pass = 0  # an endless stream of prompt indices
    else:
        stats = inspect_captions(config.captions)
        more = "" if stats.complete else "+ (first rows checked)"
        print(f"captions: {stats.captions}{more} from {config.captions.source}"
              + (f", {stats.blanks} blank rows skipped" if stats.blanks else ""))
        captions_per_pass = stats.captions
        for warning in whole_file_warnings(config.captions):
            print(f"warning: {warning}", file=sys.stderr)
        if stats.complete:
            check_caption_supply_of_one_pass(config, stats.captions, steps)
    generator_class(config.generator).preflight(config.generator)
    from .models import check_encoder

    check_encoder(config.model)
    if config.eval.data:
        from .evaluation import check_eval_data

        simulator = config.generator.backend == "simulator"
        check_eval_data(config.eval.data, config.generator.world if simulator else None)
    check_local_fit(config)
    warn_if_unbalanced(config)
    return captions_per_pass


def warn_if_unbalanced(config: Config) -> None:
    """Say so when generated images go unused, or when the generator/trainer split, the generator call
    size or the caption-synthesis stage (by measured or estimated rates) wastes throughput."""
    from .tools.planner import (
        caption_rate,
        check_balance,
        check_call_length,
        check_caption_supply,
        check_image_use,
        consumed_captions_per_s,
        per_unit_rates,
        rates_for,
    )

    warnings = [check_image_use(config)]
    rates = rates_for(config)
    if rates:
        actor_rate, worker_rate = per_unit_rates(config, rates)
        warnings += [check_balance(config, actor_rate, worker_rate), check_call_length(config, actor_rate)]
        captions = caption_rate(config)
        if captions:
            warnings.append(check_caption_supply(config, captions, consumed_captions_per_s(config, actor_rate,
                                                                                            worker_rate)))
    for warning in warnings:
        if warning:
            print(f"warning: {warning}", file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> int:
    config = load_from_args(args)  # before the heavy imports: a bad config is refused in a blink
    from .storage import check_storage
    from .training.resume import check_resume

    check_storage(config)  # before the resume check reads it
    resume = check_resume(config, args.max_steps, args.allow_config_change)
    for line in resume.lines(config, args.max_steps):
        print(line)
    if resume.finished:
        return 0
    captions_per_pass = preflight(config, args.max_steps)
    from .console import TrainConsole
    from .runtime import init_ray, sigterm_as_ctrl_c
    from .training.optim import describe_lr
    from .training.trainer import fit

    t = config.train
    print(f"training: {t.steps} steps x {t.batch_size} images ({config.captions_per_worker_step} captions x "
          f"{config.group_size} per worker step), objective {t.objective}, {describe_lr(config)}")
    console = TrainConsole(config)
    import ray
    from ray.train import TrainingFailedError

    try:
        init_ray(config)
        with sigterm_as_ctrl_c(), console:
            result = fit(config, max_steps=args.max_steps, captions_per_pass=captions_per_pass,
                         progress=console.queue)
    except TrainingFailedError as err:  # an actor or worker refused the config: its one line, not Ray's trace
        refused = ConfigError.raised_in(err)
        if refused is None:
            raise
        ray.shutdown()
        raise refused from None
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C: Ray Train aborts the run, and its ray.get exits
        from .storage import latest_checkpoint

        ray.shutdown()
        for line in console.interrupted(latest_checkpoint(config)):
            print(line)
        return 130
    ray.shutdown()  # prints the workers' last log lines now, so that the summary comes last
    for line in console.summary(result):
        print(line)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    config = load_from_args(args)
    from .storage import check_storage

    check_storage(config)
    captions_per_pass = preflight(config)
    from .sweep import run_sweep

    outputs = run_sweep(config, resume=args.resume, captions_per_pass=captions_per_pass)
    return 130 if outputs.interrupted else 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .tools.planner import plan

    print(plan(load_from_args(args), gpus=args.gpus, measure=args.measure))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .console import EvalProgress, eval_summary
    from .evaluation import evaluate
    from .runtime import configure_data_context, sigterm_as_ctrl_c

    configure_data_context()  # evaluate starts or joins Ray itself (runtime.start_ray), once its checks pass
    overrides = {"knn_k": args.k, "knn_temperature": args.temperature, "batch_size": args.batch_size,
                 "max_images": args.max_images}
    with sigterm_as_ctrl_c():  # evaluate keeps it in charge across the Ray session it may start
        results = evaluate(args.checkpoint, args.data, method=args.method, output=args.output, overrides=overrides,
                           use_ray=not args.in_process, num_actors=args.num_actors,
                           num_gpus_per_actor=args.num_gpus, weights=args.weights, progress=EvalProgress())
    for line in eval_summary(results):
        print(line)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .models.export import export_encoder, load_snippet, output_format, preprocessing_warning
    from .runtime import sigterm_as_ctrl_c

    fmt = output_format(args.out, args.format)
    with sigterm_as_ctrl_c():  # `kill` too removes the half-written file and says so
        cfg = export_encoder(args.checkpoint, args.out, fmt, args.weights)
    print(f"exported the {cfg['architecture']} encoder of {args.checkpoint} "
          f"(weights: {args.weights or 'those evaluation uses'}) to {args.out}")
    print("load it without stablerep-ray:\n" + load_snippet(args.out, fmt))
    warning = preprocessing_warning(cfg)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def cmd_make_tiny_pipeline(args: argparse.Namespace) -> int:
    from .runtime import quiet_model_loading
    from .tools.tiny_pipeline import make_tiny_pipeline

    quiet_model_loading()  # transformers' "Writing model shards" bar, once per text encoder
    path = make_tiny_pipeline(args.directory, args.seed, family=args.family)
    print(f"saved a tiny random {args.family} text-to-image pipeline to {path}")
    return 0


def cmd_make_tiny_llm(args: argparse.Namespace) -> int:
    from .runtime import quiet_model_loading
    from .tools.tiny_llm import make_tiny_llm

    quiet_model_loading()
    print(f"saved a tiny random causal language model to {make_tiny_llm(args.directory, args.seed)}")
    return 0


def cmd_synth_captions(args: argparse.Namespace) -> int:
    config = load_from_args(args)
    if config.captions.source != SYNTH_SOURCE:
        raise ConfigError(f"captions.source: {config.captions.source!r} is not 'synth'; set captions.source=synth "
                          f"and a captions.synth section (see configs/synclr-captions-quickstart.yaml)")
    from .captions.synth.preview import preview

    print(preview(config, args.num, args.output))
    return 0


def cmd_make_captions(args: argparse.Namespace) -> int:
    from .tools.simulator import make_captions

    path = Path(args.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    captions = make_captions(args.num, args.seed, args.world, args.shape_only, args.shape_only_first)
    path.write_text("\n".join(captions) + "\n")
    print(f"wrote {args.num} simulator captions ({args.world} world) to {path}")
    return 0


def cmd_config_reference(args: argparse.Namespace) -> int:
    from .config import reference_markdown

    print(reference_markdown())
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("stablerep-ray")
    except PackageNotFoundError:  # run from a source tree that is not installed
        from . import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stablerep-ray", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="generate images on an actor pool and train on the stream")
    _add_config_args(p)
    p.add_argument("--max-steps", type=int, help="stop after this step (the lr schedule keeps train.steps)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume a run under a config that differs from the one it was trained with "
                        "(the old one is kept as config.<time>.yaml)")
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
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint directory (holds model.pt), local or a URI (s3://, gs://, file://)")
    p.add_argument("--data", required=True,
                   help="TRAIN[:TEST]: ImageFolder, parquet, or simulator:<attr>; one set per call (the run's "
                        "eval.data, one spec or a list, is not read: run eval once per set)")
    p.add_argument("--method", choices=["knn", "linear", "both"], default="knn")
    p.add_argument("--output", help="results directory (default: CHECKPOINT/eval; outputs/eval/NAME for a URI)")
    p.add_argument("--k", type=int, help="kNN neighbours (default: the run's eval.knn_k)")
    p.add_argument("--temperature", type=float, help="kNN vote temperature (default: eval.knn_temperature)")
    p.add_argument("--batch-size", type=int, help="images per decode block and forward batch (eval.batch_size)")
    p.add_argument("--max-images", type=int, help="class-balanced cap per set, 0: all (eval.max_images)")
    p.add_argument("--num-actors", type=int, default=0,
                   help="feature actors (default: one per free GPU, else half the free CPUs)")
    p.add_argument("--num-gpus", type=float, help="GPUs per feature actor (default: 1 if the cluster has GPUs, else 0)")
    p.add_argument("--weights", help="weight set of the checkpoint: 'model' (the trained network) or an extra "
                   "one such as SynCLR's 'teacher' (default: the one the objective reports)")
    p.add_argument("--in-process", action="store_true",
                   help="no Ray: decode and embed block by block in this process (small sets)")
    _add_verbose_arg(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write a checkpoint's encoder as safetensors that plain timm loads")
    p.add_argument("checkpoint", help="checkpoint directory (holds model.pt) or the model.pt file")
    p.add_argument("out", help="a directory (hf layout), or a *.safetensors file (timm layout)")
    p.add_argument("--format", choices=["hf", "timm"],
                   help="hf: config.json + model.safetensors (timm 'local-dir:' / 'hf-hub:'); timm: one "
                        "safetensors file with the config in its metadata (default: by OUT's name)")
    p.add_argument("--weights", help="weight set of the checkpoint (default: the one evaluation uses)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("make-tiny-pipeline", help="save a tiny random text-to-image pipeline for offline use")
    p.add_argument("directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--family", choices=FAMILIES, default="sd15",
                   help="architecture: SD 1.5, SDXL (two CLIP encoders), PixArt-alpha (T5), SD3 (flow matching), "
                        "FLUX.1-dev (packed latents, guidance embedding), Sana (Gemma 2, DC-AE), Qwen-Image "
                        "(Qwen2.5-VL, true_cfg_scale), Z-Image (Qwen3, single-stream DiT)")
    p.set_defaults(func=cmd_make_tiny_pipeline)

    p = sub.add_parser("make-tiny-llm", help="save a tiny random causal language model for offline use")
    p.add_argument("directory")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_tiny_llm)

    p = sub.add_parser("synth-captions", help="preview captions.synth: N prompts' captions, kinds and concepts")
    _add_config_args(p)
    p.add_argument("--num", type=int, default=20, help="prompts 0..N-1")
    p.add_argument("--output", help="also write them: .txt (one caption per line) or JSON lines")
    p.set_defaults(func=cmd_synth_captions)

    p = sub.add_parser("make-captions", help="write simulator captions (composable attributes)")
    p.add_argument("path")
    p.add_argument("--num", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world", default="default", choices=SIMULATOR_WORLDS,
                   help="the simulator world (generator.world) whose attributes the captions name")
    p.add_argument("--shape-only", type=float, default=0.0, metavar="SHARE",
                   help="share of captions that name only the shape ('a photo of a star')")
    p.add_argument("--shape-only-first", type=int, default=0, metavar="N",
                   help="the first N captions all name only the shape (a warm-up: shape before colour)")
    p.set_defaults(func=cmd_make_captions)

    p = sub.add_parser("config-reference", help="print every config key with default and meaning")
    p.set_defaults(func=cmd_config_reference)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "verbose", False):
        from .console import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"  # read by this process and inherited by a local Ray's workers
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # train and tune say more; elsewhere (eval, a second Ctrl-C) a line, no traceback
        print(f"interrupted: stablerep-ray {args.command} stopped before it finished", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
