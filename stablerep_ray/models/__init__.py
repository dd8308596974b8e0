"""Models: the timm image encoder with its projection head, StableRep+'s text tower and tokenizers,
and the checkpoint file that rebuilds them without the training code."""

from .heads import PatchHead, ProjectionHead
from .io import MODEL_FILE, load_model, save_model
from .vision import CropOutputs, StableRepModel, build_model, check_encoder, create_encoder

__all__ = [
    "MODEL_FILE", "CropOutputs", "PatchHead", "ProjectionHead", "StableRepModel", "build_model", "check_encoder",
    "create_encoder", "load_model", "save_model",
]
