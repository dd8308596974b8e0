"""Losses: StableRep's multi-positive contrastive loss (SimCLR as its two-view case) and the
image-text loss of StableRep+, each single-process or across ranks."""

from .contrastive import image_text_loss, multi_positive_loss, simclr_loss

__all__ = ["image_text_loss", "multi_positive_loss", "simclr_loss"]
