"""The short causal depthwise convolution that linear-RNN memories put after their q/k/v projections.

Its left context (the last ``kernel - 1`` inputs) lives in the caller's state, so a stream cut
into calls anywhere gives the same outputs as one call.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["causal_conv", "check_kernel", "identity_plus"]


def causal_conv(p: Tensor, context: Tensor, taps: Tensor) -> tuple[Tensor, Tensor]:
    """Depthwise causal convolution of ``p`` [b, n, C] with ``taps`` [C, kernel].

    ``y_t = sum_j taps[:, j] * p_{t - kernel + 1 + j}``, where inputs before ``p`` come from
    ``context``: the last tap weighs the token itself.

    Args:
        p: [b, n, C] inputs (projections).
        context: [b, kernel - 1, C] the inputs before ``p`` (zeros at a stream's start).
        taps: [C, kernel] one filter per channel.

    Returns:
        ``y`` [b, n, C] in ``p``'s dtype, and the next context [b, kernel - 1, C].
    """
    full = torch.cat([context.to(p.dtype), p], dim=1)  # [b, kernel - 1 + n, C]
    taps = taps.to(p.dtype)
    n, kernel = p.shape[1], taps.shape[1]
    # A sum of shifted copies in the [b, n, C] layout: a depthwise conv1d needs [b, C, n] (a transpose in, and out a
    # view whose last dim is not contiguous, which sends attention downstream to its slow path), and is slower itself.
    y = full[:, :n] * taps[:, 0]
    for j in range(1, kernel):
        y = torch.addcmul(y, full[:, j : j + n], taps[:, j])
    return y, full[:, full.shape[1] - context.shape[1] :]


def identity_plus(offset: Tensor) -> Tensor:
    """Conv taps [C, kernel] that are the identity plus a learned ``offset`` [C, kernel].

    The last tap (the token itself) is ``1 + offset[:, -1]``, the others are the offset: with the
    offset at zero (its initial value) the conv passes its input through, so a model warm-started
    from one without the conv begins exactly as that model.
    """
    return torch.cat([offset[:, :-1], offset[:, -1:] + 1.0], dim=1)


def check_kernel(name: str, kernel: int) -> None:
    """Refuse a config's conv ``kernel`` of 1 (0 is no conv): a 1-tap depthwise conv is a per-channel scale."""
    if kernel == 1:
        raise ValueError(f"{name} must be 0 (no conv) or at least 2 (a 1-tap depthwise conv is a per-channel scale)")
