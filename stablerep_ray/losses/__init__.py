"""Losses: StableRep's multi-positive contrastive loss (SimCLR as its two-view case, SynCLR's
student-against-teacher form), the image-text loss of StableRep+, and SynCLR's masked-patch loss,
each single-process or across ranks."""

from .contrastive import image_text_loss, multi_positive_loss, simclr_loss, teacher_multi_positive_loss
from .ibot import masked_patch_loss, sinkhorn_knopp

__all__ = [
    "image_text_loss", "masked_patch_loss", "multi_positive_loss", "simclr_loss", "sinkhorn_knopp",
    "teacher_multi_positive_loss",
]
