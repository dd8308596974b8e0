"""Train one objective in one process, no Ray, and watch its loss terms, embedding spread and kNN.

    uv run python -m bench.objective_probe --config configs/synclr-spatial.yaml --steps 200
    uv run python -m bench.objective_probe --config configs/synclr-spatial.yaml --start 6400
    uv run python -m bench.objective_probe --config configs/spatial-quickstart.yaml --every 10 --eval-every 0

For diagnosing an objective (a term that never moves, embeddings that collapse to one point), not the
pipeline: ``bench.learning`` measures through the real one. The config's captions are read in file
order from line ``--start`` (wrapping), ``train.batch_size`` inputs a step as the stream makes them
(labels by caption text, as ``caption_rows`` gives them: a repeated caption's images are positives),
each caption's first ``stream.images_per_group`` simulator images (``generator.seed`` as the run's),
through the one training step (``TrainStep``: views, loss, optimiser, schedule, teacher update). Every
``--every`` steps it prints the step's loss terms and ``embed/*`` spreads (1 spread out, 0 one point:
the console's collapse check); every ``--eval-every`` steps the held-out kNN of each module online
evaluation probes (SynCLR: teacher and student) on ``--attributes`` of the config's world.
"""

from __future__ import annotations

import sys
import time

from . import common
from .learning import knn_scorer

MODULE = "bench.objective_probe"


def caption_batches(config, start: int, captions_per_step: int):
    """Endless stream batches of the config's captions in file order from line ``start``."""
    from pathlib import Path

    import numpy as np

    from stablerep_ray.captions import caption_rows, normalise_caption
    from stablerep_ray.stream import Batch
    from stablerep_ray.tools.simulator import SimulatorGenerator

    lines = (normalise_caption(line) for line in Path(config.captions.source).read_text().splitlines())
    captions = [text for text in lines if text]
    m = config.images_drawn_per_group
    generator = SimulatorGenerator(config.generator.model_copy(update={"images_per_caption": m}))
    position = start
    while True:
        positions = np.arange(position, position + captions_per_step, dtype=np.int64) % len(captions)
        position += captions_per_step
        # The stream's rows: a caption's id is its text's, so repeats of a caption are positives.
        rows = caption_rows(0, positions.tolist(), [captions[i] for i in positions])
        images = generator(rows)["images"]
        yield Batch(images=images.reshape(-1, *images.shape[2:]), caption_ids=np.repeat(rows["caption_id"], m),
                    captions=list(rows["caption"]), keys=positions)


def main(argv: list[str] | None = None, command: str = MODULE) -> int:
    """``command``: the module named in the output's first line (bench.key_gradient runs this one)."""
    p = common.arg_parser(command, __doc__, config="configs/spatial-quickstart.yaml")
    p.add_argument("--steps", type=int, default=None, help="default: the config's train.steps")
    p.add_argument("--start", type=int, default=0, help="first caption line read")
    p.add_argument("--every", type=int, default=25, help="steps between loss lines")
    p.add_argument("--eval-every", type=int, default=100, help="steps between kNN lines (0: first and last only)")
    p.add_argument("--attributes", nargs="+", default=["shape", "color"])
    p.add_argument("--per-class", type=int, default=50, help="held-out images per class (bank and queries each)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch

    from stablerep_ray.config import load_config
    from stablerep_ray.training.step import TrainStep

    overrides = [f"train.seed={args.seed}", f"generator.seed={args.seed}", *args.overrides]
    if args.steps:
        overrides.insert(0, f"train.steps={args.steps}")
    config = load_config(args.config, overrides)
    if config.generator.backend != "simulator" or not config.captions.source.endswith(".txt"):
        p.error("--config: needs generator.backend simulator and a local .txt caption file (captions.source)")
    steps = config.train.steps
    score = knn_scorer(args.attributes, args.per_class, config.generator.output_size, config.model.image_size,
                       config.eval.knn_k, config.eval.knn_temperature, config.generator.world)
    torch.manual_seed(args.seed)
    step = TrainStep.build(config, torch.device("cpu"), seed=args.seed)
    captions_per_step = config.train.batch_size // step.objective.inputs_per_group(config)
    batches = caption_batches(config, args.start, captions_per_step)

    def evaluate(done: int) -> None:
        for name, module in step.objective.eval_modules(step.model).items():
            was_training = module.training
            module.eval()
            scores = score(module)
            module.train(was_training)
            print(f"step {done:5d}  {name}  " + "  ".join(f"{a} {v:.3f}" for a, v in scores.items()), flush=True)

    print(f"# {common.command_line(command)}\n# {config.train.objective}, {captions_per_step} captions x "
          f"{config.images_drawn_per_group} images a step from caption {args.start} of {config.captions.source}, "
          f"world {config.generator.world}", flush=True)
    evaluate(0)
    t0 = time.perf_counter()
    for done in range(1, steps + 1):
        result = step(next(batches))
        if done % args.every == 0 or done == steps:
            terms = "  ".join(f"{k} {float(v):.4f}" for k, v in result.metrics.items()
                              if k.startswith(("loss/", "embed/")))
            print(f"step {done:5d}  loss {result.loss.item():.4f}  {terms}  ({time.perf_counter() - t0:.0f}s)",
                  flush=True)
        if done == steps or (args.eval_every and done % args.eval_every == 0):
            evaluate(done)
    return 0


if __name__ == "__main__":
    sys.exit(main())
