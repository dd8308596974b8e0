"""Heads on top of the encoder: the contrastive projection MLP (also SynCLR's predictor) and the
iBOT patch head with weight-normalised prototypes."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

Norm = Literal["batch", "layer"]


class ProjectionHead(nn.Module):
    """MLP with a norm and activation between linear layers (paper: 768 -> 4096 -> 4096 -> 256).

    ``norm="batch"``: BatchNorm + ReLU, default init, a plain last layer (StableRep, as the authors'
    code). ``"layer"``: LayerNorm + GELU, truncated-normal init, and the output itself layer-normed
    without affine parameters after a bias-free last layer (MoCo v3's design as SynCLR's released
    code builds it: embeddings are centred before the loss L2-normalises them, and the EMA teacher
    has no batch statistics to keep in step).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 3, norm: Norm = "batch"):
        super().__init__()
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            if norm == "batch":
                layers += [nn.Linear(dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
            else:
                layers += [nn.Linear(dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.GELU()]
            dim = hidden_dim
        if norm == "batch":
            layers.append(nn.Linear(dim, out_dim))
        else:
            layers += [nn.Linear(dim, out_dim, bias=False), nn.LayerNorm(out_dim, elementwise_affine=False)]
            for layer in layers:
                if isinstance(layer, nn.Linear):
                    _truncated_normal(layer)
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, chunks: int = 1) -> torch.Tensor:
        """``chunks`` > 1 runs the MLP on that many equal consecutive slices of ``x`` separately, so
        each BatchNorm batch holds one slice (one view of every caption: no two positives)."""
        if chunks == 1:
            return self.mlp(x)
        return torch.cat([self.mlp(part) for part in x.chunk(chunks)])


class PatchHead(nn.Module):
    """iBOT/DINO head: a GELU MLP to a bottleneck, L2-normalised, then cosine logits against
    ``prototypes`` unit vectors (a weight-normalised last layer with its gain fixed at 1)."""

    def __init__(self, in_dim: int, hidden_dim: int, bottleneck_dim: int, prototypes: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                _truncated_normal(layer)
        self.prototypes = nn.Linear(bottleneck_dim, prototypes, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(tokens), dim=-1)
        return x @ F.normalize(self.prototypes.weight, dim=-1).T


def _truncated_normal(layer: nn.Linear) -> None:
    """Head init as DINO and SynCLR's code: weights N(0, 0.02) (``trunc_normal_``), zero bias."""
    nn.init.trunc_normal_(layer.weight, std=0.02)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
