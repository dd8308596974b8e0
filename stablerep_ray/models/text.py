"""StableRep+'s text tower: a CLIP-style causal Transformer over caption tokens."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import TextTowerConfig


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
