"""Encoders and heads: a timm ViT (CLS feature), the MLP projection head, and StableRep+'s text tower.

A checkpoint's ``model.pt`` holds ``{"config": Config dict, "model": state_dict}`` so evaluation can
rebuild the exact architecture without the training code (``load_model``).
"""

from __future__ import annotations

import math
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Config, ConfigError, ModelConfig, TextTowerConfig, from_dict

MODEL_FILE = "model.pt"


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class TextTower(nn.Module):
    """CLIP-style causal Transformer; the feature is the final-norm state at the end-of-text token."""

    def __init__(self, cfg: TextTowerConfig, vocab_size: int, embed_dim: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.randn(cfg.context_length, cfg.width) * 0.01)
        layer = nn.TransformerEncoderLayer(
            cfg.width, cfg.heads, 4 * cfg.width, dropout=0.0, activation="gelu",
            batch_first=True, norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.ln_final = nn.LayerNorm(cfg.width)
        self.projection = nn.Linear(cfg.width, embed_dim, bias=False)
        mask = torch.full((cfg.context_length, cfg.context_length), float("-inf")).triu(1)
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """tokens: (B, L) ids padded after the end token; lengths: (B,) tokens up to and incl. EOT."""
        L = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:L]
        x = self.transformer(x, mask=self.causal_mask[:L, :L], is_causal=True)
        x = self.ln_final(x)
        eot = x[torch.arange(x.shape[0], device=x.device), (lengths - 1).clamp(min=0)]
        return self.projection(eot)


class StableRepModel(nn.Module):
    """Image encoder + projection head, plus a text tower and logit scale for StableRep+."""

    def __init__(self, cfg: ModelConfig, text_vocab_size: int = 0):
        super().__init__()
        self.encoder = create_encoder(cfg)
        self.head = ProjectionHead(
            self.encoder.num_features, cfg.head_hidden_dim, cfg.embed_dim, cfg.head_layers
        )
        self.text = TextTower(cfg.text, text_vocab_size, cfg.embed_dim) if text_vocab_size else None
        # CLIP init ln(1/0.07); clamped at ln(100) in the loss.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07))) if self.text else None

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen-evaluation feature: the encoder's CLS token."""
        return self.encoder(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised projections used by the contrastive losses."""
        return F.normalize(self.head(self.encoder(images)), dim=-1)

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(tokens, lengths), dim=-1)


def build_model(config: Config, text_vocab_size: int = 0) -> StableRepModel:
    if config.train.objective == "stablerep_plus" and not text_vocab_size:
        raise ValueError("stablerep_plus needs the tokenizer's vocabulary size for the text tower")
    return StableRepModel(config.model, text_vocab_size)


def save_model(model: nn.Module, config: Config, directory: str | Path, text_vocab_size: int = 0) -> None:
    state = {
        "config": config.model_dump(mode="json"),
        "text_vocab_size": text_vocab_size,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    torch.save(state, Path(directory) / MODEL_FILE)


def load_model(checkpoint: str | Path) -> tuple[StableRepModel, Config]:
    """Rebuild the model saved in a checkpoint directory (or its ``model.pt``) on the CPU."""
    path = Path(checkpoint)
    file = path / MODEL_FILE if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"{checkpoint}: no {MODEL_FILE} found; pass a checkpoint directory")
    state = torch.load(file, map_location="cpu", weights_only=False)
    config = from_dict(state["config"])
    model = StableRepModel(config.model, state.get("text_vocab_size", 0))
    model.load_state_dict(state["model"])
    return model.eval(), config
