"""The image model: a timm ViT (CLS feature) with an MLP projection head, plus the optional parts
an objective adds: StableRep+'s text tower and logit scale, SynCLR's predictor, patch head and mask
token. Which parts exist is fixed by ``build_model``'s arguments, saved with the weights."""

from __future__ import annotations

import math
from dataclasses import dataclass

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import checkpoint_seq

from ..config import Config, ConfigError, ModelConfig
from .heads import Norm, PatchHead, ProjectionHead
from .text import TextTower


def create_encoder(cfg: ModelConfig, **extra) -> nn.Module:
    """A timm backbone returning the CLS token after the final norm (``num_classes=0``); ``extra``
    are timm arguments an objective needs (SynCLR: ``dynamic_img_size`` for its small crops)."""
    kwargs = {"pretrained": False, "num_classes": 0, **cfg.kwargs, **extra}
    if cfg.name.startswith(("vit_", "deit_")):
        kwargs.setdefault("global_pool", "token")
        kwargs.setdefault("img_size", cfg.image_size)
    try:
        encoder = timm.create_model(cfg.name, **kwargs)
    except RuntimeError as err:  # timm raises RuntimeError for unknown names
        raise ConfigError(f"model.name: {err}; see timm.list_models('vit_*')") from None
    except TypeError as err:
        raise ConfigError(f"model.kwargs: {err}") from None
    if cfg.stem == "conv":
        embed = getattr(encoder, "patch_embed", None)
        patch = embed.patch_size[0] if embed is not None else 0
        if patch < 2 or patch & (patch - 1) or embed.patch_size[0] != embed.patch_size[1]:
            raise ConfigError(f"model.stem: 'conv' needs a ViT with a square power-of-two patch size "
                              f"({cfg.name} has {getattr(embed, 'patch_size', 'no patch embedding')}); "
                              f"set model.stem=patch or model.kwargs.patch_size")
        embed.proj = conv_stem(patch, encoder.embed_dim)
    if cfg.grad_checkpointing:
        try:
            encoder.set_grad_checkpointing(True)
        except (AttributeError, AssertionError, NotImplementedError):  # timm asserts for models without it
            raise ConfigError(f"model.grad_checkpointing: timm's {cfg.name} does not support it; set it to "
                              f"false") from None
    return encoder


def check_encoder(cfg: ModelConfig) -> None:
    """Build the encoder on the meta device (no memory; ~0.4 s for a ViT-L): a model.name, kwargs, stem or
    grad_checkpointing that timm refuses fails before Ray starts instead of in every train worker."""
    with torch.device("meta"):
        create_encoder(cfg)


def conv_stem(patch: int, dim: int, width: int = 48) -> nn.Sequential:
    """A convolutional patch embedding (Xiao et al. 2021): log2(patch) stride-2 3x3 convolutions with
    BatchNorm and ReLU, widths doubling from ``width``, then a 1x1 projection to ``dim``. Same token
    grid as the one strided convolution it replaces, but a ViT trained from scratch gets local
    features to build on instead of having to learn them from a linear map of raw patches."""
    layers: list[nn.Module] = []
    channels = 3
    for k in range(patch.bit_length() - 1):
        out = width * 2**k
        layers += [nn.Conv2d(channels, out, 3, 2, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
        channels = out
    layers.append(nn.Conv2d(channels, dim, 1))
    return nn.Sequential(*layers)


@dataclass
class CropOutputs:
    """What one network (student or teacher) makes of a multi-crop batch."""

    global_z: torch.Tensor  # L2-normalised embeddings of the global crops
    local_z: torch.Tensor | None  # of the local crops (student only)
    patch_logits: torch.Tensor | None  # patch-head logits at the masked positions, (masked patches, K)


class StableRepModel(nn.Module):
    """Image encoder + projection head, and the optional parts (see the module docstring):
    ``text_vocab_size`` > 0 adds a text tower and logit scale; ``predictor_hidden_dim`` > 0 a
    predictor MLP after the head; ``patch_head`` (PatchHead's arguments) an iBOT head and a mask token.
    """

    def __init__(self, cfg: ModelConfig, text_vocab_size: int = 0, head_norm: Norm = "batch",
                 predictor_hidden_dim: int = 0, patch_head: dict | None = None,
                 encoder_kwargs: dict | None = None):
        super().__init__()
        self.encoder = create_encoder(cfg, **(encoder_kwargs or {}))
        width = self.encoder.num_features
        self.head = ProjectionHead(width, cfg.head_hidden_dim, cfg.embed_dim, cfg.head_layers, head_norm)
        self.text = self.image_to_text = self.logit_scale = None
        if text_vocab_size:
            self.text = TextTower(cfg.text, text_vocab_size)
            # The image side of the image-text loss: a linear projection of the CLS feature.
            self.image_to_text = nn.Linear(width, cfg.text.embed_dim, bias=False)
            nn.init.normal_(self.image_to_text.weight, std=width**-0.5)
            # CLIP's init ln(1/0.07); the objective keeps it in [0, ln 100] after every step.
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.predictor = self.patch_head = self.mask_token = None
        if predictor_hidden_dim:
            self.predictor = ProjectionHead(cfg.embed_dim, predictor_hidden_dim, cfg.embed_dim, 2, head_norm)
        if patch_head:
            self.patch_head = PatchHead(width, **patch_head)
            self.mask_token = nn.Parameter(torch.empty(1, 1, width).normal_(std=0.02))  # as SynCLR's code

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen-evaluation feature: the encoder's CLS token."""
        return self.encoder(images)

    def forward(self, images: torch.Tensor, head_chunks: int = 1, with_features: bool = False, *,
                multicrop: bool = False, local_crops: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        """L2-normalised projections used by the contrastive losses (``head_chunks``: see the head);
        with ``with_features`` also the CLS features they came from. With ``multicrop``, the
        student's pass over global crops, ``local_crops`` and ``mask`` instead (``crop_outputs``),
        so that DDP sees one forward per step."""
        if multicrop:
            return self.crop_outputs(images, local_crops, mask, student=True)
        features = self.encoder(images)
        z = F.normalize(self.head(features, head_chunks), dim=-1)
        return (z, features) if with_features else z

    def tokens(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The ViT's output tokens (prefix tokens first); patches where ``mask`` (B, patches) is
        True enter as the learned mask token instead of their embedding."""
        enc = self.encoder
        x = enc.patch_embed(images)  # (B, N, D), or (B, H, W, D) with dynamic_img_size
        if mask is not None:
            x = torch.where(mask.view(*x.shape[:-1], 1), self.mask_token.to(x.dtype), x)
        x = enc.norm_pre(enc.patch_drop(enc._pos_embed(x)))
        if getattr(enc, "grad_checkpointing", False) and torch.is_grad_enabled():  # model.grad_checkpointing
            return enc.norm(checkpoint_seq(enc.blocks, x))
        return enc.norm(enc.blocks(x))

    def crop_outputs(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None = None,
                     mask: torch.Tensor | None = None, student: bool = True) -> CropOutputs:
        """Embeddings of multi-crop inputs. The student sees its global crops masked and passes every
        embedding through the predictor; the teacher sees them whole and gives its patch-head
        logits at the positions the student had masked (its targets)."""
        tokens = self.tokens(global_crops, mask if student else None)
        prefix = self.encoder.num_prefix_tokens
        global_z = self._embed(self.encoder.forward_head(tokens, pre_logits=True), student)
        local_z = None
        if local_crops is not None and len(local_crops):
            local_z = self._embed(self.encoder(local_crops), student)
        patch_logits = None
        if self.patch_head is not None and mask is not None:
            patch_logits = self.patch_head(tokens[:, prefix:][mask])
        return CropOutputs(global_z, local_z, patch_logits)

    def _embed(self, features: torch.Tensor, predict: bool) -> torch.Tensor:
        z = self.head(features)
        if predict and self.predictor is not None:
            z = self.predictor(z)
        return F.normalize(z, dim=-1)

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(tokens, lengths), dim=-1)

    def image_for_text(self, features: torch.Tensor) -> torch.Tensor:
        """CLS features in the joint image-text space, L2-normalised."""
        return F.normalize(self.image_to_text(features), dim=-1)


def build_model(config: Config, **parts) -> StableRepModel:
    """The model a run of ``config`` starts from; ``parts`` are the objective's ``model_kwargs``
    (see ``StableRepModel``), saved in model.pt so a checkpoint rebuilds the same modules."""
    return StableRepModel(config.model, **parts)
