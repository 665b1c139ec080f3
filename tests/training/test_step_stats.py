"""``scale_and_clip`` against torchtune's ``scale_grads`` + torch's ``clip_grad_norm_`` (what the stock recipe
runs): the same gradient bits and norm, frozen parameters and parameters without a gradient left alone."""

from __future__ import annotations

import pytest
import torch
from torchtune.training import scale_grads

from docev.training.step_stats import scale_and_clip


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4), torch.nn.Linear(4, 4))
    model[0].requires_grad_(False)  # frozen, as the vision tower
    out = model[1](model[0](torch.randn(5, 8)))  # model[2] gets no gradient, as the connector on text-only steps
    (out.square().sum() * 37.0).backward()
    return model


@pytest.mark.parametrize("max_norm", [None, 1.0, 1e6])
def test_scale_and_clip_matches_torchtune_scale_grads_and_clip(max_norm):
    ours, theirs = _model(0), _model(0)
    optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad])
    scale = 2 / 37.0
    norm = scale_and_clip(optimizer, scale, max_norm)

    scale_grads(theirs, torch.tensor(scale))
    params = [p for p in theirs.parameters() if p.grad is not None]
    if max_norm is None:
        expected = torch.nn.utils.get_total_norm([p.grad for p in params])
    else:
        expected = torch.nn.utils.clip_grad_norm_(params, max_norm=max_norm)
    assert norm == expected.item()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            assert torch.equal(a.grad, b.grad)
    assert ours[0].weight.grad is None and ours[2].weight.grad is None
    if max_norm == 1.0:  # clipped: the norm returned is the one before clipping, the gradients now at max_norm
        assert norm > 1.0
        clipped = torch.nn.utils.get_total_norm([p.grad for p in ours.parameters() if p.grad is not None])
        assert clipped.item() == pytest.approx(1.0, rel=1e-5)


def test_scale_and_clip_without_any_gradient():
    """No trainable parameter reached by the loss: nothing to scale, the norm is 0 (as torchtune's loop gives)."""
    model = torch.nn.Linear(3, 3)
    assert scale_and_clip(torch.optim.AdamW(model.parameters()), 0.5, 1.0) == 0.0
    assert model.weight.grad is None
