"""StableRep+: StableRep plus a CLIP-style loss between each caption's images and its text.

It owns a text tower and a linear projection of the image CLS feature into the joint space (built
into the model, so DDP and checkpoints see them), a learnable logit scale, and a tokenizer: an
explicit ``model.text.tokenizer``, else the generator pipeline's own. As in the authors' code, the
image side of the image-text loss is that projection, not the SSL head's output.
"""

from __future__ import annotations

import math

from .stablerep import StableRep

MAX_LOGIT_SCALE = math.log(100)


class StableRepPlus(StableRep):
    name = "stablerep_plus"

    def __init__(self, config):
        super().__init__(config)
        from ...models.tokenizers import load_tokenizer

        self.tokenizer = load_tokenizer(config.model.text.tokenizer, config.generator)

    def model_kwargs(self):
        return {"text_vocab_size": self.tokenizer.vocab_size}

    def loss(self, forward, model, inputs, labels, batch):
        import torch

        from ...losses import image_text_loss, multi_positive_loss
        from ..telemetry import embedding_spread

        z, features = forward(inputs, self.head_chunks, with_features=True)
        image_loss = multi_positive_loss(z, labels, self.config.train.temperature, distributed=True)
        tokens, lengths = self.tokenizer.encode(batch.captions, self.config.model.text.context_length)
        text_z = model.encode_text(tokens.to(z.device), lengths.to(z.device))
        text_labels = torch.from_numpy(batch.group_ids.copy()).to(z.device)
        text_loss = image_text_loss(model.image_for_text(features), labels, text_z, text_labels,
                                    model.logit_scale, distributed=True)
        metrics = {"loss/image": image_loss.detach(), "loss/image_text": text_loss.detach(),
                   "logit_scale": model.logit_scale.detach().exp(), "embed/spread": embedding_spread(z)}
        return image_loss + text_loss, metrics

    def after_step(self, model, step):
        """Clamp the logit scale in place to [0, ln 100], as CLIP: a clamp in the forward would leave
        it a zero gradient above the cap, so it could never come back."""
        import torch

        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
