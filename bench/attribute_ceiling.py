"""Can the encoder learn a simulator attribute at all in this budget, given its labels?

    uv run python -m bench.attribute_ceiling --attribute shape --steps 400
    uv run python -m bench.attribute_ceiling --attribute shape --steps 400 --set model.stem=conv
    uv run python -m bench.attribute_ceiling --config configs/spatial-quickstart.yaml --steps 200

A supervised ceiling for the self-supervised runs of ``bench.learning``: the config's encoder (its
architecture, input size and initialisation) plus a linear classifier, trained with cross-entropy on
the attribute's labels, on fresh simulator images each step (every attribute drawn uniformly, nuisance
from the prior, in the config's ``generator.world``, evaluation preprocessing, no augmentation),
``--batch-size`` images per step, AdamW at a constant ``--lr``. Every ``--every`` steps it prints the
held-out kNN of the encoder's CLS features on ``--probe`` attributes (the sets and scorer
``bench.learning`` uses). If labels cannot teach an
attribute in N steps, no contrastive objective will within N steps either, and the cause is the
encoder or the renderer, not the objective (docs/learning.md, "What the encoder can see").
In-process, no Ray: it measures the model, not the pipeline.
"""

from __future__ import annotations

import sys
import time

from . import common
from .learning import knn_scorer

MODULE = "bench.attribute_ceiling"


def main(argv: list[str] | None = None) -> int:
    p = common.arg_parser(MODULE, __doc__, config="configs/quickstart.yaml")
    p.add_argument("--attribute", default="shape", help="the label the classifier is trained on")
    p.add_argument("--probe", nargs="+", default=None, help="attributes scored by kNN (default: the trained one)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--per-class", type=int, default=50, help="held-out images per class (bank and queries each)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import numpy as np
    import torch

    from stablerep_ray.augment import eval_transform
    from stablerep_ray.config import load_config
    from stablerep_ray.models import build_model
    from stablerep_ray.tools.simulator import ATTRIBUTES, WORLDS, render_attributes

    config = load_config(args.config, args.overrides)
    names = list(ATTRIBUTES)
    target = names.index(args.attribute)
    size, image_size = config.generator.output_size, config.model.image_size
    probes = args.probe or [args.attribute]
    world = WORLDS[config.generator.world]
    score = knn_scorer(probes, args.per_class, size, image_size, config.eval.knn_k, config.eval.knn_temperature,
                       world.name)
    torch.manual_seed(args.seed)
    model = build_model(config)
    classifier = torch.nn.Linear(model.encoder.num_features, len(ATTRIBUTES[args.attribute]))
    params = [*model.encoder.parameters(), *classifier.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=config.train.weight_decay)
    rng = np.random.default_rng(args.seed)
    sizes = [len(ATTRIBUTES[a]) for a in names]

    def show(step: int, loss: float, t0: float) -> None:
        acc = score(model)
        print(f"step {step:5d}  loss {loss:.3f}  " + "  ".join(f"{a} {v:.3f}" for a, v in acc.items())
              + f"  ({time.perf_counter() - t0:.0f}s)", flush=True)

    print(f"# {common.command_line(MODULE)}\n# {config.model.name} {config.model.kwargs} stem={config.model.stem}, "
          f"world {world.name}, "
          f"{size} px rendered -> {image_size} px; supervised on {args.attribute} "
          f"(chance {1 / sizes[target]:.3f})", flush=True)
    t0 = time.perf_counter()
    show(0, float("nan"), t0)
    for step in range(1, args.steps + 1):
        codes = rng.integers(0, sizes, size=(args.batch_size, len(names)))
        world.apply_fixed(codes)
        images = np.stack([render_attributes(dict(zip(names, c.tolist())), size, rng, world=world)
                           for c in codes])
        logits = classifier(model.features(eval_transform(images, image_size)))
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(codes[:, target]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % args.every == 0 or step == args.steps:
            show(step, loss.item(), t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
