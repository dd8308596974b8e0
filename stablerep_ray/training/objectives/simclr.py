"""SimCLR: one image per caption in two augmented views; the views of an image are its only positives.

The baseline StableRep is compared with at an equal number of encoder inputs per step.
"""

from __future__ import annotations

from .base import Objective


class SimCLR(Objective):
    name = "simclr"
    caption_positives = False
    views_per_image = 2

    def loss(self, forward, model, inputs, labels, batch):
        from ...losses import simclr_loss
        from ..telemetry import embedding_spread

        z = forward(inputs, self.head_chunks)
        loss = simclr_loss(*z.chunk(2), self.config.train.temperature, distributed=True)
        return loss, {"loss/image": loss.detach(), "embed/spread": embedding_spread(z)}
