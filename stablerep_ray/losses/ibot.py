"""iBOT's masked-patch loss as SynCLR uses it: the student predicts, at the patches it saw masked,
the teacher's distribution over prototypes, whose targets are centred by Sinkhorn-Knopp.

Both work on the masked patches only (rows of ``(M, K)`` logits; ``M`` may differ between ranks and
be zero on some). Across ranks they follow the contrastive losses' convention: each rank returns
``world x (its sum) / (global count)``, so the mean over ranks is the global loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .contrastive import _full_precision, _global_mean, _sum_over_ranks, _world


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temperature: float, iterations: int = 3,
                   distributed: bool = False) -> torch.Tensor:
    """Teacher targets from teacher logits ``(M, K)``: alternately make every prototype carry an
    equal share of the global batch's mass and every patch a distribution (rows summing to 1), so no
    prototype can absorb all patches (the collapse a plain softmax teacher allows)."""
    with _full_precision(logits):
        world, _ = _world(distributed)
        scaled = logits.float() / temperature
        peak = scaled.max() if scaled.numel() else scaled.new_tensor(-torch.inf)
        if world > 1:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        q = torch.exp(scaled - peak).T  # (K, M)
        prototypes = q.shape[0]
        patches = _sum_over_ranks(torch.tensor(q.shape[1], device=q.device), world)
        q /= _sum_over_ranks(q.sum(), world)
        for _ in range(iterations):
            q /= _sum_over_ranks(q.sum(dim=1, keepdim=True), world)  # each prototype: total 1 / K
            q /= prototypes
            q /= q.sum(dim=0, keepdim=True)  # each patch: total 1 / M
            q /= patches
        return (q * patches).T


def masked_patch_loss(student_logits: torch.Tensor, targets: torch.Tensor, patch_images: torch.Tensor,
                      temperature: float = 0.1, distributed: bool = False) -> torch.Tensor:
    """Cross-entropy of the student's patch distribution (logits / ``temperature``) against the
    teacher's ``targets`` at masked patches, averaged over each image's masked patches, then over the
    masked images of the global batch. ``patch_images`` gives each row's image (any integer id)."""
    with _full_precision(student_logits):
        world, _ = _world(distributed)
        log_p = F.log_softmax(student_logits.float() / temperature, dim=-1)
        per_patch = -(targets.float() * log_p).sum(dim=-1)
        images, index, counts = patch_images.unique(return_inverse=True, return_counts=True)
        per_image = torch.zeros(len(images), device=per_patch.device).index_add(0, index, per_patch)
        per_image = per_image / counts
        num_images = _sum_over_ranks(torch.tensor(len(images), device=per_patch.device), world)
        return _global_mean(per_image, num_images, world)
