"""LDPv2 pooling: floor semantics (ratio 3 on 8×8 keeps 2×2 and ignores the last two rows/columns)."""

import pytest
import torch

from docev.models.docev import ldpv2_connector


def test_ratio_three_floors_and_ignores_the_remainder():
    torch.manual_seed(0)
    conn = ldpv2_connector(in_dim=8, out_dim=16, grid=8)
    x = torch.randn(2, 64, 8)
    out = conn(x, 3)
    assert out.shape == (2, 2, 2, 16)
    changed = x.view(2, 8, 8, 8).clone()
    changed[:, 6:, :] += 5.0
    changed[:, :, 6:] += 5.0
    assert torch.equal(conn(changed.view(2, 64, 8), 3), out)
    changed[:, 5, 0] += 5.0  # inside the pooled area
    assert not torch.equal(conn(changed.view(2, 64, 8), 3), out)
    assert conn(x, 2).shape == (2, 4, 4, 16)


def test_peg_is_a_depthwise_residual():
    conn = ldpv2_connector(in_dim=8, out_dim=16, grid=8)
    assert conn.peg.groups == 16 and conn.peg.weight.shape == (16, 1, 3, 3)
    x = torch.randn(1, 64, 8)
    with torch.no_grad():
        conn.peg.weight.zero_()
        conn.peg.bias.zero_()
        pooled = torch.nn.functional.avg_pool2d(conn.mlp(x).view(1, 8, 8, 16).permute(0, 3, 1, 2), 2)
    torch.testing.assert_close(conn(x, 2), pooled.permute(0, 2, 3, 1))


def test_ratio_out_of_range():
    conn = ldpv2_connector(in_dim=8, out_dim=16, grid=8)
    with pytest.raises(ValueError, match="sampling_ratio 9 outside 1..8"):
        conn(torch.randn(1, 64, 8), 9)
