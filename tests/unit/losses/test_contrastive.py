"""Losses against direct per-anchor computations, NT-Xent and CLIP, and 2-process gloo runs against
the single-process loss over the concatenated batch."""

import datetime
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from stablerep_ray.losses.contrastive import image_text_loss, multi_positive_loss, simclr_loss

WORLD = 2


# -- direct references ---------------------------------------------------------------------------------
def naive_multi_positive(features, labels, tau):
    """The paper's formula, one anchor at a time, in fp64."""
    z = F.normalize(features.double(), dim=1)
    labels = labels.tolist()
    losses = []
    for i in range(len(z)):
        others = [k for k in range(len(z)) if k != i]
        positives = [j for j in others if labels[j] == labels[i]]
        if not positives:
            continue
        log_denom = torch.logsumexp(torch.stack([z[i] @ z[k] / tau for k in others]), 0)
        losses.append(-sum(z[i] @ z[j] / tau - log_denom for j in positives) / len(positives))
    return torch.stack(losses).mean()


def naive_cross_modal(anchors, anchor_labels, targets, target_labels, scale):
    """One direction of the image-text loss: uniform target over same-label rows, fp64."""
    za, zt = F.normalize(anchors.double(), dim=1), F.normalize(targets.double(), dim=1)
    losses = []
    for a, y in zip(za, anchor_labels.tolist()):
        positives = [j for j, t in enumerate(target_labels.tolist()) if t == y]
        if positives:
            log_q = torch.log_softmax(scale * zt @ a, dim=0)
            losses.append(-sum(log_q[j] for j in positives) / len(positives))
    return torch.stack(losses).mean()


def naive_image_text(image_features, image_labels, text_features, text_labels, logit_scale):
    scale = torch.as_tensor(logit_scale).double().exp()
    return (
        naive_cross_modal(image_features, image_labels, text_features, text_labels, scale)
        + naive_cross_modal(text_features, text_labels, image_features, image_labels, scale)
    ) / 2


def nt_xent(view1, view2, tau):
    """SimCLR's NT-Xent as usually written: 2N-way cross-entropy with the other view as target."""
    n = len(view1)
    z = F.normalize(torch.cat([view1, view2]).double(), dim=1)
    logits = (z @ z.T / tau).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    return F.cross_entropy(logits, torch.cat([torch.arange(n) + n, torch.arange(n)]))


def grouped_labels(sizes, seed=0):
    """Shuffled caption ids (large and non-contiguous, like global ids) for groups of given sizes."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 2**40, (len(sizes),), generator=g)
    labels = torch.cat([ids[i].repeat(s) for i, s in enumerate(sizes)])
    return labels[torch.randperm(len(labels), generator=g)]


def leaf(*shape, seed=0, dtype=torch.float64):
    return torch.randn(
        *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype
    ).requires_grad_()


# -- multi-positive loss --------------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_multi_positive_matches_per_anchor_loop(tau):
    labels = grouped_labels([3, 2, 5, 1, 4, 2, 1])
    x = leaf(len(labels), 16)
    loss = multi_positive_loss(x, labels, tau)
    (grad,) = torch.autograd.grad(loss, x)
    y = x.detach().clone().requires_grad_()
    reference = naive_multi_positive(y, labels, tau)
    (ref_grad,) = torch.autograd.grad(reference, y)
    torch.testing.assert_close(loss, reference, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-10)


def test_multi_positive_fp32_matches_fp64_reference():
    labels = grouped_labels([6, 6, 6, 6], seed=1)
    x = leaf(len(labels), 32, seed=1, dtype=torch.float32)
    loss = multi_positive_loss(x, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(
        loss.double(), naive_multi_positive(x, labels, 0.1), rtol=1e-5, atol=1e-6
    )


def test_mask_is_rebuilt_from_labels_every_call():
    x = leaf(8, 4, seed=2)
    for sizes in ([2, 2, 2, 2], [4, 4], [3, 1, 4]):
        labels = grouped_labels(sizes, seed=len(sizes))
        torch.testing.assert_close(
            multi_positive_loss(x, labels), naive_multi_positive(x, labels, 0.1)
        )


def test_two_images_per_caption_is_nt_xent():
    n = 7
    v1, v2 = leaf(n, 16, seed=3), leaf(n, 16, seed=4)
    expected = nt_xent(v1, v2, 0.2)
    torch.testing.assert_close(simclr_loss(v1, v2, 0.2), expected)
    order = torch.randperm(2 * n, generator=torch.Generator().manual_seed(0))
    shuffled = torch.cat([v1, v2])[order]
    labels = (torch.arange(2 * n) % n * 1000 + 17)[order]  # arbitrary ids, pairs in shuffled order
    torch.testing.assert_close(multi_positive_loss(shuffled, labels, 0.2), expected)


def test_singletons_are_excluded_without_nan():
    labels = torch.tensor([5, 9, 5, 3, 7, 7, 7, 11])  # 9, 3, 11 have no positive
    x = leaf(len(labels), 8, seed=5)
    loss = multi_positive_loss(x, labels)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(loss, naive_multi_positive(x, labels, 0.1))
    # Singletons still act as negatives: dropping them changes the loss.
    keep = torch.tensor([0, 2, 4, 5, 6])
    assert not torch.allclose(loss, multi_positive_loss(x[keep], labels[keep]))


@pytest.mark.parametrize("n", [1, 6])
def test_all_singletons_give_connected_zero(n):
    x = leaf(n, 8, seed=6)
    loss = multi_positive_loss(x, torch.arange(n))
    assert loss.item() == 0 and loss.requires_grad
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_logits_stay_fp32_under_bf16_autocast():
    labels = grouped_labels([4, 4, 4, 4], seed=7)
    x = leaf(len(labels), 64, seed=7, dtype=torch.float32)
    expected = multi_positive_loss(x, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        from_fp32 = multi_positive_loss(x, labels)
        from_bf16 = multi_positive_loss(x.bfloat16(), labels)
    assert from_fp32.dtype == from_bf16.dtype == torch.float32
    torch.testing.assert_close(from_fp32, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(from_bf16, multi_positive_loss(x.bfloat16().float(), labels))


# -- image-text loss -----------------------------------------------------------------------------------
def test_image_text_matches_direct_computation():
    image_labels = torch.tensor(
        [4, 8, 4, 8, 8, 4, 2, 6]
    )  # 3 images of 4 and 8, 1 of 2, 6 has no text
    text_labels = torch.tensor([8, 2, 4, 5])  # 5 has no image
    images, texts = leaf(8, 16, seed=8), leaf(4, 16, seed=9)
    logit_scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
    loss = image_text_loss(images, image_labels, texts, text_labels, logit_scale)
    grads = torch.autograd.grad(loss, (images, texts, logit_scale))
    inputs = [t.detach().clone().requires_grad_() for t in (images, texts, logit_scale)]
    reference = naive_image_text(inputs[0], image_labels, inputs[1], text_labels, inputs[2])
    ref_grads = torch.autograd.grad(reference, inputs)
    torch.testing.assert_close(loss, reference, rtol=1e-10, atol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)


def test_image_text_with_one_image_per_text_is_clip():
    n = 6
    images, texts = leaf(n, 16, seed=10), leaf(n, 16, seed=11)
    logit_scale = torch.tensor(2.5, dtype=torch.float64)
    zi, zt = F.normalize(images, dim=1), F.normalize(texts, dim=1)
    logits = logit_scale.exp() * zi @ zt.T
    clip = (
        F.cross_entropy(logits, torch.arange(n)) + F.cross_entropy(logits.T, torch.arange(n))
    ) / 2
    labels = torch.arange(n) + 100
    torch.testing.assert_close(image_text_loss(images, labels, texts, labels, logit_scale), clip)
    torch.testing.assert_close(image_text_loss(images, labels, texts, labels, 2.5), clip)


def test_logit_scale_keeps_its_gradient_above_ln_100():
    """No clamp in the forward: a clamped forward gave a scale past ln 100 a zero gradient forever
    (StableRep+ clamps the parameter in place after each step instead)."""
    labels = torch.tensor([0, 0, 1, 1])
    images, texts = leaf(4, 8, seed=12), leaf(2, 8, seed=13)
    text_labels = torch.tensor([0, 1])
    above = torch.tensor(math.log(1000), dtype=torch.float64, requires_grad=True)
    loss = image_text_loss(images, labels, texts, text_labels, above)
    torch.testing.assert_close(loss, naive_image_text(images, labels, texts, text_labels, above.detach()))
    loss.backward()
    assert above.grad.item() != 0


def test_image_text_fp32_under_autocast():
    labels = torch.tensor([0, 0, 1, 1])
    images, texts = (
        leaf(4, 8, seed=14, dtype=torch.float32),
        leaf(2, 8, seed=15, dtype=torch.float32),
    )
    scale = torch.tensor(math.log(50.0))
    expected = image_text_loss(images, labels, texts, torch.tensor([0, 1]), scale)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = image_text_loss(
            images.bfloat16(), labels, texts.bfloat16(), torch.tensor([0, 1]), scale
        )
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-2, atol=1e-2)  # only the inputs were rounded


# -- two processes over gloo ---------------------------------------------------------------------------
def _mp_case(rank_labels, seed):
    labels = torch.tensor(rank_labels).flatten()
    return "multi_positive", [leaf(len(labels), 8, seed=seed)], [labels]


def _it_case(image_labels, text_labels, seed):
    labels = [torch.tensor(image_labels).flatten(), torch.tensor(text_labels).flatten()]
    return "image_text", [leaf(len(y), 8, seed=seed + i) for i, y in enumerate(labels)], labels


# Rebuilt identically (seeded) when the spawned workers import this module.
DISTRIBUTED_CASES = {
    # Groups spanning both ranks, one singleton per rank.
    "mp_spanning": _mp_case([[0, 0, 1, 2, 7, 1], [2, 3, 3, 3, 0, 8]], seed=20),
    # Rank 0 has 5 valid anchors (a singleton), rank 1 has 6: per-rank means would be biased.
    "mp_uneven_valid": _mp_case([[4, 9, 5, 6, 4, 5], [6, 5, 4, 6, 6, 5]], seed=21),
    # Rank 0 has no positives at all but its images are negatives for rank 1.
    "mp_rank_without_positives": _mp_case([[10, 11, 12, 13, 14, 15], [1, 1, 2, 2, 2, 3]], seed=22),
    "mp_all_singletons": _mp_case([[0, 1, 2], [3, 4, 5]], seed=23),
    # Image ids must not collide across ranks.
    "simclr": ("simclr", [leaf(8, 8, seed=24), leaf(8, 8, seed=25)], []),
    # StableRep+ layout: each rank holds its captions' texts and their m images.
    "it_local_groups": _it_case(
        [[0, 0, 0, 1, 1, 1], [2, 2, 2, 3, 3, 3]], [[0, 1], [2, 3]], seed=26
    ),
    # Texts and images split across ranks; images of 3 and 5 lack a text, text 9 lacks images.
    "it_spanning": _it_case([[0, 0, 0, 1, 1, 5], [2, 2, 1, 3, 3, 3]], [[0, 2], [1, 9]], seed=28),
}


def _run_case(case, rank=None):
    """Loss, input gradients and logit-scale gradient for one rank's slice (None: whole batch)."""
    kind, inputs, labels = case
    part = (lambda t: t) if rank is None else (lambda t: t.chunk(WORLD)[rank])
    inputs = [part(t).detach().clone().requires_grad_() for t in inputs]
    labels = [part(y) for y in labels]
    logit_scale = torch.tensor(math.log(20.0), dtype=torch.float64, requires_grad=True)
    distributed = rank is not None
    if kind == "multi_positive":
        loss = multi_positive_loss(inputs[0], labels[0], 0.1, distributed=distributed)
    elif kind == "simclr":
        loss = simclr_loss(*inputs, 0.1, distributed=distributed)
    else:
        loss = image_text_loss(
            inputs[0], labels[0], inputs[1], labels[1], logit_scale, distributed=distributed
        )
    loss.backward()
    return loss.detach(), [t.grad for t in inputs], logit_scale.grad


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        results = {name: _run_case(case, rank) for name, case in DISTRIBUTED_CASES.items()}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", list(DISTRIBUTED_CASES))
def test_distributed_equals_single_process_over_concatenated_batch(distributed_results, name):
    loss, grads, scale_grad = _run_case(DISTRIBUTED_CASES[name])
    losses, rank_grads, scale_grads = zip(*(r[name] for r in distributed_results))
    # What gets logged: the mean of the per-rank losses.
    torch.testing.assert_close(torch.stack(losses).mean(), loss)
    # Each rank's feature rows receive the summed contributions of all ranks' losses (all-gather
    # backward) and DDP then averages over ranks, so the effective gradient is grad / WORLD.
    for i, grad in enumerate(grads):
        torch.testing.assert_close(torch.cat([g[i] for g in rank_grads]) / WORLD, grad)
    # The logit scale is a replicated parameter: DDP averages its per-rank gradients.
    if scale_grad is not None:
        torch.testing.assert_close(torch.stack(scale_grads).mean(), scale_grad)
