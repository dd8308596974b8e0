"""SynCLR (arXiv 2312.17742): StableRep's caption positives, learned against an EMA teacher, with
multi-crop and iBOT's masked-patch loss.

Per drawn image: ``synclr.global_crops`` crops at the model's input size and ``synclr.local_crops``
small ones. The student sees its global crops with some patches masked; the teacher (an EMA copy of
encoder and heads, no gradient) sees them whole. Two terms:

* contrastive: every student crop (through the student-only predictor) against the teacher's
  global-crop embeddings of the global batch; positives are its caption's images. A global crop
  leaves out its own view's teacher embedding (the same crop); a local crop's own image counts, as
  the authors' code runs it (``synclr.local_matches_own_image``). Global and local crops each give
  one mean.
* iBOT: at the masked patches, the student's prototype distribution against the teacher's, whose
  targets are centred by Sinkhorn-Knopp; the teacher temperature warms up linearly.

The teacher is what evaluation reports by default (as the authors); it is saved in model.pt beside
the student, so a checkpoint resumes it exactly and ``stablerep-ray eval`` can probe either.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .base import Objective

if TYPE_CHECKING:
    import torch

    from ...augment import Crops


@dataclass
class SynCLRInputs:
    crops: Crops
    mask: torch.Tensor | None  # (global crops, patches) bool: patches the student sees masked
    image_ids: torch.Tensor  # (images,) index of each drawn image within the rank's batch
    caption_ids: torch.Tensor  # (images,)


def teacher_momentum(step: int, total: int, start: float, end: float) -> float:
    """EMA momentum after optimiser step ``step`` of ``total``: a half cosine from start to end."""
    return end + (start - end) * (1 + math.cos(math.pi * min(step, total) / total)) / 2


def teacher_temperature(step: int, warmup: int, start: float, end: float) -> float:
    """Teacher patch temperature at ``step``: linear from start to end over ``warmup`` steps."""
    return end if step >= warmup else start + (end - start) * step / warmup


def patch_size(config) -> int | None:
    """The ViT patch size the config asks for (``model.kwargs.patch_size``, else from the name)."""
    if "patch_size" in config.model.kwargs:
        return int(config.model.kwargs["patch_size"])
    found = re.search(r"patch(\d+)", config.model.name)
    return int(found.group(1)) if found else None


class SynCLR(Objective):
    name = "synclr"
    eval_weights = "teacher"

    @classmethod
    def inputs_per_group(cls, config):
        return cls.images_drawn_per_group(config) * config.synclr.global_crops

    @classmethod
    def batch_unit(cls):
        return "stream.images_per_group x synclr.global_crops"

    @classmethod
    def relative_cost(cls, config):
        """Per global crop: its forward + backward (3 units), the teacher's forward (1 unit) and the
        local crops' forward + backward, scaled by their token count (heads are not counted)."""
        s, patch = config.synclr, patch_size(config) or 16
        tokens = (config.model.image_size // patch) ** 2 + 1
        local_tokens = (s.local_size // patch) ** 2 + 1
        return 1 + 1 / 3 + s.local_crops / s.global_crops * local_tokens / tokens

    @classmethod
    def check_config(cls, config):
        super().check_config(config)
        s, model = config.synclr, config.model
        if not model.name.startswith(("vit_", "deit_")):
            raise ValueError(
                f"model.name: the 'synclr' objective masks ViT patch tokens; {model.name!r} is not a timm "
                f"VisionTransformer, pick a vit_* model"
            )
        patch = patch_size(config)
        for key, size in (("synclr.local_size", s.local_size), ("model.image_size", model.image_size)):
            if patch and size % patch:
                raise ValueError(f"{key}: {size} px is not a multiple of the ViT patch size {patch}; "
                                 f"use {max(patch, size // patch * patch)}")
        for key, (lo, hi) in (("synclr.global_crop_scale", s.global_crop_scale),
                              ("synclr.local_crop_scale", s.local_crop_scale)):
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"{key}: need 0 < low <= high <= 1, got {lo, hi}")
        for key, values in (("synclr.global_blur_p", s.global_blur_p),
                            ("synclr.global_solarize_p", s.global_solarize_p)):
            if not all(0 <= p <= 1 for p in values):
                raise ValueError(f"{key}: probabilities must lie in [0, 1], got {values}")
        if not 0 <= s.teacher_momentum[0] <= s.teacher_momentum[1] <= 1:
            raise ValueError(f"synclr.teacher_momentum: need 0 <= start <= end <= 1, got {s.teacher_momentum}")
        if min(s.teacher_temperature) <= 0:
            raise ValueError(f"synclr.teacher_temperature: both values must be > 0, got {s.teacher_temperature}")

    def __init__(self, config):
        super().__init__(config)
        self.teacher = None
        self.patches = 0  # patches of one global crop, known once the model exists
        self.steps_done = 0

    def model_kwargs(self):
        s = self.config.synclr
        kwargs = {"head_norm": "layer", "predictor_hidden_dim": s.predictor_hidden_dim,
                  "encoder_kwargs": {"dynamic_img_size": True}}
        if s.ibot_weight:
            kwargs["patch_head"] = {"hidden_dim": s.ibot_hidden_dim, "bottleneck_dim": s.ibot_bottleneck_dim,
                                    "prototypes": s.prototypes}
        return kwargs

    def setup(self, model):
        self.teacher = copy.deepcopy(model).requires_grad_(False).eval()
        grid = model.encoder.patch_embed.grid_size
        self.patches = grid[0] * grid[1]

    def build_augment(self):
        from ...augment import MultiCrop

        s, augment = self.config.synclr, self.config.augment

        def recipe(scale, blur, solarize):
            return augment.model_copy(update={"crop_scale": scale, "blur_p": blur, "solarize_p": solarize})

        global_recipes = [recipe(s.global_crop_scale, blur, solarize)
                          for blur, solarize in zip(s.global_blur_p, s.global_solarize_p, strict=True)]
        return MultiCrop(global_recipes, self.config.model.image_size, s.global_crops,
                         recipe(s.local_crop_scale, s.local_blur_p, 0.0), s.local_size, s.local_crops)

    def views(self, images, caption_ids, augment, generator):
        import torch

        from ...augment import random_patch_masks

        s = self.config.synclr
        images, caption_ids = self.image_major(images, caption_ids)
        crops = augment(images, generator)
        mask = None
        if s.ibot_weight:
            mask = random_patch_masks(len(crops.global_crops), self.patches, s.mask_probability, s.mask_ratio,
                                      generator)
        image_ids = torch.arange(len(caption_ids), device=caption_ids.device)
        return SynCLRInputs(crops, mask, image_ids, caption_ids), caption_ids.repeat(s.global_crops)

    def loss(self, forward, model, inputs, labels, batch):
        import torch

        from ...losses import masked_patch_loss, sinkhorn_knopp, teacher_multi_positive_loss
        from ..telemetry import embedding_spread

        s, tau = self.config.synclr, self.config.train.temperature
        crops, mask = inputs.crops, inputs.mask
        student = forward(crops.global_crops, multicrop=True, local_crops=crops.local_crops, mask=mask)
        with torch.no_grad():
            teacher = self.teacher.crop_outputs(crops.global_crops, mask=mask, student=False)

        def contrast(queries, copies, query_ids, key_ids):
            return teacher_multi_positive_loss(queries, inputs.caption_ids.repeat(copies), query_ids,
                                               teacher.global_z, labels, key_ids, tau, distributed=True)

        # A global crop leaves out its own view's teacher embedding; its image's other global crops count.
        views = torch.arange(len(labels), device=labels.device)
        metrics = {"loss/contrastive_global": contrast(student.global_z, s.global_crops, views, views)}
        if student.local_z is not None:
            own = None if s.local_matches_own_image else inputs.image_ids.repeat(s.local_crops)
            metrics["loss/contrastive_local"] = contrast(student.local_z, s.local_crops, own,
                                                         inputs.image_ids.repeat(s.global_crops))
        total = s.contrastive_weight * sum(metrics.values())
        if mask is not None:
            temperature = teacher_temperature(self.steps_done, s.teacher_temperature_warmup_steps,
                                              *s.teacher_temperature)
            targets = sinkhorn_knopp(teacher.patch_logits, temperature, s.sinkhorn_iterations, distributed=True)
            crop_of_patch = torch.arange(len(mask), device=mask.device)[:, None].expand_as(mask)[mask]
            ibot = masked_patch_loss(student.patch_logits, targets, crop_of_patch, s.student_temperature,
                                     distributed=True)
            total = total + s.ibot_weight * ibot
            metrics["loss/ibot"] = ibot
            metrics["synclr/teacher_temperature"] = torch.tensor(temperature)
            metrics["synclr/masked_fraction"] = mask.float().mean()
        metrics = {k: v.detach() for k, v in metrics.items()}
        metrics["synclr/teacher_momentum"] = torch.tensor(self.momentum())
        metrics["embed/spread"] = embedding_spread(student.global_z)
        metrics["embed/teacher_spread"] = embedding_spread(teacher.global_z)
        return total, metrics

    def momentum(self) -> float:
        return teacher_momentum(self.steps_done, self.config.train.steps, *self.config.synclr.teacher_momentum)

    def after_step(self, model, step):
        """Move the teacher towards the student: t <- m t + (1 - m) s, m on the cosine schedule."""
        import torch

        m = self.momentum()
        with torch.no_grad():
            teacher, student = list(self.teacher.parameters()), [p.detach() for p in model.parameters()]
            torch._foreach_mul_(teacher, m)
            torch._foreach_add_(teacher, student, alpha=1 - m)
            for t, b in zip(self.teacher.buffers(), model.buffers(), strict=True):
                t.copy_(b)
        self.steps_done += 1

    def extra_weights(self):
        return {"teacher": self.teacher}

    def eval_modules(self, model):
        modules = {"eval": self.teacher}
        if self.config.synclr.eval_student:
            modules["eval/student"] = model
        return modules

    def state_dict(self):
        return {"steps_done": self.steps_done}

    def load_state_dict(self, state):
        self.steps_done = state.get("steps_done", 0)
