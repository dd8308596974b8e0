"""Contrastive losses: StableRep's multi-positive loss (SimCLR as its m=2 case), SynCLR's
student-against-teacher form of it, and StableRep+'s image-text loss, each in a single-process and a
cross-rank form.

All losses share one primitive: a cross-entropy of each anchor row against a target spread uniformly
over that row's positives. Labels are caption ids and the positive mask is rebuilt from them on every
call, so duplicate captions and groups split across ranks are handled correctly.

Gradient convention with ``distributed=True`` (local batches of equal size on every rank): features
are all-gathered *with* gradient, the rank's own rows are the anchors, and each rank returns

    L_r = world_size * (sum of its anchors' losses) / (number of valid anchors in the global batch).

The mean of ``L_r`` over ranks is exactly the single-process loss over the concatenated batch, also
when anchors without positives are left out unevenly across ranks. The all-gather backward sums each
rank's contribution onto the owner of a feature row, so after DDP averages the parameter gradients
they equal the single-process gradients of that global loss. Logged values should be averaged over
ranks; a single rank's ``L_r`` is only an estimate.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def multi_positive_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 0.1,
    distributed: bool = False,
) -> torch.Tensor:
    """StableRep's loss: each image's target is uniform over the other images of its caption.

    ``features`` (B, D) are L2-normalised here; ``labels`` (B,) are int64 caption ids, globally
    unique per caption. Self-similarity is excluded from numerator and denominator. Anchors whose
    caption has no other image in the (global) batch are left out of the mean; if no anchor has a
    positive the loss is a zero that is still connected to the graph.

    ``distributed=True`` contrasts the local rows against the all-gathered global batch (see the
    module docstring for the gradient convention); it is a no-op without a process group.
    """
    with _full_precision(features):
        z = F.normalize(features.to(_compute_dtype(features)), dim=1)
        labels = labels.to(z.device)
        world, rank = _world(distributed)
        z_all, labels_all = _gather_with_grad(z, world), _gather(labels, world)
        n = z.shape[0]
        own_column = rank * n + torch.arange(n, device=z.device)
        is_self = torch.arange(z_all.shape[0], device=z.device)[None, :] == own_column[:, None]
        logits = (z @ z_all.T / temperature).masked_fill(is_self, -torch.finfo(z.dtype).max)
        positives = (labels[:, None] == labels_all[None, :]) & ~is_self
        _, group_sizes = labels_all.unique(return_counts=True)
        num_valid = group_sizes[group_sizes > 1].sum()
        return _global_mean(_soft_target_cross_entropy(logits, positives), num_valid, world)


def simclr_loss(
    view1: torch.Tensor, view2: torch.Tensor, temperature: float = 0.1, distributed: bool = False
) -> torch.Tensor:
    """SimCLR's NT-Xent: the multi-positive loss with the two views of an image as its only group.

    The image ids are offset by rank so that images on different ranks never share a label.
    """
    n = view1.shape[0]
    _, rank = _world(distributed)
    ids = rank * n + torch.arange(n, device=view1.device)
    return multi_positive_loss(torch.cat([view1, view2]), ids.repeat(2), temperature, distributed)


def image_text_loss(
    image_features: torch.Tensor,
    image_labels: torch.Tensor,
    text_features: torch.Tensor,
    text_labels: torch.Tensor,
    logit_scale: torch.Tensor | float,
    distributed: bool = False,
) -> torch.Tensor:
    """StableRep+'s CLIP-style term: 1/2 [H(image->text) + H(text->image)].

    An image's target is its caption's text; a text's target is uniform over its m images. The
    logit scale is exp(logit_scale), unclamped: the caller keeps the parameter in range (CLIP clamps
    it in place after each step, so its gradient never vanishes). Images without
    a text (and texts without an image) in the global batch are left out of their direction's mean.
    """
    with _full_precision(image_features):
        dtype = _compute_dtype(image_features)
        zi = F.normalize(image_features.to(dtype), dim=1)
        zt = F.normalize(text_features.to(dtype), dim=1)
        scale = torch.as_tensor(logit_scale, device=zi.device).to(dtype)
        scale = scale.exp()
        image_labels, text_labels = image_labels.to(zi.device), text_labels.to(zi.device)
        world, _ = _world(distributed)
        zi_all, yi_all = _gather_with_grad(zi, world), _gather(image_labels, world)
        zt_all, yt_all = _gather_with_grad(zt, world), _gather(text_labels, world)
        image_rows = _soft_target_cross_entropy(
            scale * zi @ zt_all.T, image_labels[:, None] == yt_all[None, :]
        )
        text_rows = _soft_target_cross_entropy(
            scale * zt @ zi_all.T, text_labels[:, None] == yi_all[None, :]
        )
        image_to_text = _global_mean(image_rows, torch.isin(yi_all, yt_all).sum(), world)
        text_to_image = _global_mean(text_rows, torch.isin(yt_all, yi_all).sum(), world)
        return (image_to_text + text_to_image) / 2


def teacher_multi_positive_loss(
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    query_images: torch.Tensor | None,
    keys: torch.Tensor,
    key_labels: torch.Tensor,
    key_images: torch.Tensor,
    temperature: float = 0.08,
    distributed: bool = False,
) -> torch.Tensor:
    """SynCLR's contrastive term: student crops (``queries``) against the teacher's global-crop
    embeddings (``keys``, no gradient) of the whole global batch.

    A query's positives are the keys of the same caption (``*_labels``). With ``query_images``, the
    keys that share its id (``*_images``: ids below the rank's key count, of a view or of an image)
    are left out of numerator and denominator, so a global crop is not its own positive; without
    (``None``), every key of the caption counts, as SynCLR's code matches a local crop to its own
    image's global crop. Anchors without a positive are left out of the mean; across ranks the
    gradient convention is the module docstring's.
    """
    with _full_precision(queries):
        dtype = _compute_dtype(queries)
        q = F.normalize(queries.to(dtype), dim=1)
        k = F.normalize(keys.detach().to(dtype), dim=1)
        world, rank = _world(distributed)
        offset = rank * len(keys)  # image indices are below the rank's key count: unique after this
        k_all = _gather(k, world)
        key_labels_all = _gather(key_labels.to(q.device), world)
        logits = q @ k_all.T / temperature
        positives = query_labels.to(q.device)[:, None] == key_labels_all[None, :]
        if query_images is not None:
            key_images_all = _gather(key_images.to(q.device) + offset, world)
            own = (query_images.to(q.device)[:, None] + offset) == key_images_all[None, :]
            logits = logits.masked_fill(own, -torch.finfo(q.dtype).max)
            positives &= ~own
        num_valid = _sum_over_ranks(positives.any(dim=1).sum(), world)
        return _global_mean(_soft_target_cross_entropy(logits, positives), num_valid, world)


# --------------------------------------------------------------------------------------------------
def _soft_target_cross_entropy(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Per-row -sum_j p_j log softmax(logits)_j with p uniform over the row's positives.

    Selecting with ``torch.where`` keeps the huge negative log-probability of a masked self-logit
    out of the sum, so rows without positives contribute exactly zero, never NaN.
    """
    log_q = logits.log_softmax(dim=1)
    return -torch.where(positives, log_q, 0.0).sum(dim=1) / positives.sum(dim=1).clamp(min=1)


def _global_mean(row_losses: torch.Tensor, num_valid: torch.Tensor, world: int) -> torch.Tensor:
    """world * local sum / global valid count: averaging over ranks gives the global mean."""
    return world * row_losses.sum() / num_valid.clamp(min=1)


def _sum_over_ranks(count: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        count = count.clone()
        dist.all_reduce(count)
    return count


def _compute_dtype(features: torch.Tensor) -> torch.dtype:
    """At least fp32 (bf16/fp16 logits lose the small differences the softmax needs), fp64 kept."""
    return torch.promote_types(features.dtype, torch.float32)


def _full_precision(features: torch.Tensor) -> torch.autocast:
    """Disable autocast so the similarity matmul really runs in fp32 under a bf16 training step."""
    return torch.autocast(device_type=features.device.type, enabled=False)


def _world(distributed: bool) -> tuple[int, int]:
    """(world size, rank); a single process when not asked for or no process group is initialised."""
    if distributed and dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient for a row onto the rank that owns it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.world, ctx.rank = dist.get_world_size(), dist.get_rank()
        return _gather(x, ctx.world)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)  # autograd owns the incoming buffer
        dist.all_reduce(grad)  # works on gloo too (reduce_scatter does not)
        return grad.chunk(ctx.world)[ctx.rank]


def _gather_with_grad(x: torch.Tensor, world: int) -> torch.Tensor:
    return _GatherWithGrad.apply(x) if world > 1 else x


def _gather(x: torch.Tensor, world: int) -> torch.Tensor:
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)
