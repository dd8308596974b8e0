"""StableRep+'s text tower: a CLIP-style causal Transformer over caption tokens, initialised as CLIP."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import TextTowerConfig


class QuickGELU(nn.Module):
    """CLIP's GELU approximation, x * sigmoid(1.702 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class TextTower(nn.Module):
    """CLIP-style causal Transformer; the feature is the final-norm state at the end-of-text token,
    projected to the joint image-text space (``cfg.embed_dim``)."""

    def __init__(self, cfg: TextTowerConfig, vocab_size: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        layer = nn.TransformerEncoderLayer(
            cfg.width, cfg.heads, 4 * cfg.width, dropout=0.0, activation=QuickGELU(),
            batch_first=True, norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.ln_final = nn.LayerNorm(cfg.width)
        self.projection = nn.Linear(cfg.width, cfg.embed_dim, bias=False)
        mask = torch.full((cfg.context_length, cfg.context_length), float("-inf")).triu(1)
        self.register_buffer("causal_mask", mask, persistent=False)
        self._init_as_clip(cfg)

    def _init_as_clip(self, cfg: TextTowerConfig) -> None:
        """CLIP's text init: small embeddings, residual projections scaled down with depth."""
        width = cfg.width
        attn_std, proj_std, fc_std = width**-0.5, width**-0.5 * (2 * cfg.layers) ** -0.5, (2 * width) ** -0.5
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for block in self.transformer.layers:
            nn.init.normal_(block.self_attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.self_attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.linear1.weight, std=fc_std)
            nn.init.normal_(block.linear2.weight, std=proj_std)
        nn.init.normal_(self.projection.weight, std=width**-0.5)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """tokens: (B, L) ids padded after the end token; lengths: (B,) tokens up to and incl. EOT."""
        L = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:L]
        x = self.transformer(x, mask=self.causal_mask[:L, :L], is_causal=True)
        x = self.ln_final(x)
        eot = x[torch.arange(x.shape[0], device=x.device), (lengths - 1).clamp(min=0)]
        return self.projection(eot)
