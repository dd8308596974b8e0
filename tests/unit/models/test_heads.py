"""The heads' two designs: StableRep's BatchNorm MLP and SynCLR's LayerNorm one with a normed output."""

from __future__ import annotations

import torch

from stablerep_ray.models import ProjectionHead


def test_layer_norm_head_centres_and_scales_its_output_without_affine_parameters():
    head = ProjectionHead(12, 32, 8, num_layers=3, norm="layer")
    out = head(torch.randn(5, 12) * 3 + 1)
    torch.testing.assert_close(out.mean(1), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(1, unbiased=False), torch.ones(5), atol=2e-2, rtol=0)  # eps 1e-5
    last_linear = [m for m in head.mlp if isinstance(m, torch.nn.Linear)][-1]
    assert last_linear.bias is None
    assert not list(head.mlp[-1].parameters()), "the output norm has no weight or bias"


def test_batch_norm_head_ends_in_a_plain_linear_layer():
    head = ProjectionHead(12, 32, 8, num_layers=3, norm="batch")
    assert isinstance(head.mlp[-1], torch.nn.Linear) and head.mlp[-1].bias is not None
