"""StableRep: the m images generated from one caption are positives of each other."""

from __future__ import annotations

from .base import Objective


class StableRep(Objective):
    name = "stablerep"

    def loss(self, forward, model, inputs, labels, batch):
        from ...losses import multi_positive_loss
        from ..telemetry import embedding_spread

        z = forward(inputs, self.head_chunks)
        loss = multi_positive_loss(z, labels, self.config.train.temperature, distributed=True)
        return loss, {"loss/image": loss.detach(), "embed/spread": embedding_spread(z)}
