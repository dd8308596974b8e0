"""StableRep+: StableRep plus a CLIP-style loss between each caption's images and its text.

It owns a text tower (built into the model, so DDP and checkpoints see it) and a tokenizer: an
explicit ``model.text.tokenizer``, else the generator pipeline's own.
"""

from __future__ import annotations

from .stablerep import StableRep


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

        z = forward(inputs, self.head_chunks)
        image_loss = multi_positive_loss(z, labels, self.config.train.temperature, distributed=True)
        tokens, lengths = self.tokenizer.encode(batch.captions, self.config.model.text.context_length)
        text_z = model.encode_text(tokens.to(z.device), lengths.to(z.device))
        text_labels = torch.from_numpy(batch.group_ids.copy())
        text_loss = image_text_loss(z, labels, text_z, text_labels.to(z.device), model.logit_scale,
                                    distributed=True)
        metrics = {"loss/image": image_loss.detach(), "loss/image_text": text_loss.detach()}
        return image_loss + text_loss, metrics
