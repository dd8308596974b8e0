"""The image model: a timm ViT (CLS feature) with an MLP projection head, plus the optional text
tower and logit scale that StableRep+ trains with it."""

from __future__ import annotations

import math

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Config, ConfigError, ModelConfig
from .text import TextTower


def create_encoder(cfg: ModelConfig) -> nn.Module:
    """A timm backbone returning the CLS token after the final norm (``num_classes=0``)."""
    kwargs = {"pretrained": False, "num_classes": 0, **cfg.kwargs}
    if cfg.name.startswith(("vit_", "deit_")):
        kwargs.setdefault("global_pool", "token")
        kwargs.setdefault("img_size", cfg.image_size)
    try:
        return timm.create_model(cfg.name, **kwargs)
    except RuntimeError as err:  # timm raises RuntimeError for unknown names
        raise ConfigError(f"model.name: {err}; see timm.list_models('vit_*')") from None
    except TypeError as err:
        raise ConfigError(f"model.kwargs: {err}") from None


class ProjectionHead(nn.Module):
    """MLP with BN+ReLU between linear layers (paper: 768 -> 4096 -> 4096 -> 256)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, chunks: int = 1) -> torch.Tensor:
        """``chunks`` > 1 runs the MLP on that many equal consecutive slices of ``x`` separately, so
        each BatchNorm batch holds one slice (one view of every caption: no two positives)."""
        if chunks == 1:
            return self.mlp(x)
        return torch.cat([self.mlp(part) for part in x.chunk(chunks)])


class StableRepModel(nn.Module):
    """Image encoder + projection head; with ``text_vocab_size`` also a text tower and logit scale."""

    def __init__(self, cfg: ModelConfig, text_vocab_size: int = 0):
        super().__init__()
        self.encoder = create_encoder(cfg)
        self.head = ProjectionHead(
            self.encoder.num_features, cfg.head_hidden_dim, cfg.embed_dim, cfg.head_layers
        )
        self.text = self.image_to_text = self.logit_scale = None
        if text_vocab_size:
            self.text = TextTower(cfg.text, text_vocab_size)
            # The image side of the image-text loss: a linear projection of the CLS feature.
            self.image_to_text = nn.Linear(self.encoder.num_features, cfg.text.embed_dim, bias=False)
            nn.init.normal_(self.image_to_text.weight, std=self.encoder.num_features**-0.5)
            # CLIP's init ln(1/0.07); the objective keeps it in [0, ln 100] after every step.
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen-evaluation feature: the encoder's CLS token."""
        return self.encoder(images)

    def forward(self, images: torch.Tensor, head_chunks: int = 1, with_features: bool = False):
        """L2-normalised projections used by the contrastive losses (``head_chunks``: see the head);
        with ``with_features`` also the CLS features they came from."""
        features = self.encoder(images)
        z = F.normalize(self.head(features, head_chunks), dim=-1)
        return (z, features) if with_features else z

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(tokens, lengths), dim=-1)

    def image_for_text(self, features: torch.Tensor) -> torch.Tensor:
        """CLS features in the joint image-text space, L2-normalised."""
        return F.normalize(self.image_to_text(features), dim=-1)


def build_model(config: Config, text_vocab_size: int = 0) -> StableRepModel:
    """The model a run of ``config`` starts from (a text tower only when given a vocabulary)."""
    return StableRepModel(config.model, text_vocab_size)
