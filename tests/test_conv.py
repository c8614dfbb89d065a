"""The short causal conv of q/k/v (``memzoo.ops.conv``) against torch's depthwise conv1d."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close

from memzoo.ops.conv import causal_conv


@pytest.mark.parametrize("kernel", [2, 4])
def test_causal_conv_is_a_depthwise_conv1d_carried_across_calls(kernel):
    """The shifted-sum form equals torch's depthwise conv1d over the stream (zeros before it), cut anywhere."""
    g = torch.Generator().manual_seed(0)
    p, taps = torch.randn(2, 11, 6, generator=g, dtype=torch.float64), torch.randn(6, kernel, generator=g, dtype=torch.float64)
    ref = F.conv1d(F.pad(p.transpose(1, 2), (kernel - 1, 0)), taps[:, None, :], groups=6).transpose(1, 2)
    context, outs = torch.zeros(2, kernel - 1, 6, dtype=torch.float64), []
    for piece in (p[:, :1], p[:, 1:5], p[:, 5:]):  # a token, a few, the rest
        y, context = causal_conv(piece, context, taps)
        outs.append(y)
    assert_close(torch.cat(outs, dim=1), ref, dtype=torch.float64, n=kernel)
    assert torch.equal(context, p[:, -(kernel - 1) :]) and outs[0].is_contiguous()
