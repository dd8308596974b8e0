"""Losses: StableRep's multi-positive contrastive loss (SimCLR as its two-view case) and the
image-text loss of StableRep+, each single-process or across ranks."""

from .contrastive import MAX_LOGIT_SCALE, image_text_loss, multi_positive_loss, simclr_loss

__all__ = ["MAX_LOGIT_SCALE", "image_text_loss", "multi_positive_loss", "simclr_loss"]
