"""Which part of SynCLR's contrastive term loses colour in the simple world? Two objectives between
StableRep and SynCLR, registered for this process only and trained by ``bench.objective_probe``:

    uv run python -m bench.key_gradient --variant detached-keys --start 6400 --steps 100 \
        --every 50 --eval-every 50 --attributes color background
    uv run python -m bench.key_gradient --variant predictor --start 6400 --steps 100 ...

* ``detached-keys``: StableRep's loss with the gradient cut on the key side, as SynCLR's teacher
  keys carry none (the network is its own teacher, every step);
* ``predictor``: the same, the queries also through a predictor MLP (SynCLR's, 512 wide) and the
  keys the projection before it: SynCLR's contrastive term with teacher = student, on StableRep's
  heads, crops and settings. Its head sees the batch whole, as SynCLR's does.

Every other argument is ``bench.objective_probe``'s (the config defaults to the spatial quickstart;
``--set`` lays SynCLR's settings over it). Results: docs/learning.md, "Collapse".
"""

from __future__ import annotations

import argparse
import sys

from stablerep_ray.training.objectives import OBJECTIVES
from stablerep_ray.training.objectives.stablerep import StableRep

from . import objective_probe

MODULE = "bench.key_gradient"
PREDICTOR_HIDDEN_DIM = 512  # configs/parts/synclr-tiny.yaml's synclr.predictor_hidden_dim


class DetachedKeys(StableRep):
    """StableRep, each image's embedding a query with gradient against the batch's detached keys."""

    name = "detached-keys"

    def contrast(self, queries, keys, labels):
        import torch

        from stablerep_ray.losses import teacher_multi_positive_loss

        images = torch.arange(len(labels), device=labels.device)
        return teacher_multi_positive_loss(queries, labels, images, keys, labels, images,
                                           self.config.train.temperature, distributed=True)

    def loss(self, forward, model, inputs, labels, batch):
        from stablerep_ray.training.telemetry import embedding_spread

        z = forward(inputs, self.head_chunks)
        loss = self.contrast(z, z, labels)
        return loss, {"loss/image": loss.detach(), "embed/spread": embedding_spread(z)}


class Predictor(DetachedKeys):
    """Queries through a predictor, keys the projection it reads (detached)."""

    name = "predictor"

    def model_kwargs(self):
        return {"predictor_hidden_dim": PREDICTOR_HIDDEN_DIM}

    def loss(self, forward, model, inputs, labels, batch):
        from stablerep_ray.training.telemetry import embedding_spread

        keys = model.head(model.encoder(inputs))
        queries = model.predictor(keys)
        loss = self.contrast(queries, keys, labels)
        return loss, {"loss/image": loss.detach(), "embed/spread": embedding_spread(queries),
                      "embed/key_spread": embedding_spread(keys)}


VARIANTS = {cls.name: cls for cls in (DetachedKeys, Predictor)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return 0
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", add_help=False)
    parser.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    args, probe_args = parser.parse_known_args(argv)
    OBJECTIVES[args.variant] = VARIANTS[args.variant]
    return objective_probe.main([*probe_args, "--set", f"train.objective={args.variant}"], MODULE)


if __name__ == "__main__":
    sys.exit(main())
