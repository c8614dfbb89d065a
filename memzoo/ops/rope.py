"""Rotary position embedding (RoPE), LLaMA's half-split layout."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["apply_rope"]


def apply_rope(x: Tensor, positions: Tensor, theta: float = 10000.0) -> Tensor:
    """Rotate ``x`` by its positions.

    Args:
        x: [b, h, s, k] queries or keys (k even).
        positions: [s] integer positions (the same for every batch row and head).
        theta: RoPE base.

    Returns:
        [b, h, s, k], same dtype as ``x`` (the angles are computed in fp32).

    Reference: Su et al., "RoFormer" (arXiv 2104.09864), eq. 34.
    """
    k = x.shape[-1]
    if k % 2:
        raise ValueError(f"RoPE needs an even head dim, got {k}")
    inv_freq = theta ** (-torch.arange(0, k, 2, device=x.device, dtype=torch.float32) / k)  # [k/2]
    angles = positions.to(device=x.device, dtype=torch.float32)[:, None] * inv_freq  # [s, k/2]
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1).to(x.dtype)  # [s, k]
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1).to(x.dtype)
    x1, x2 = x[..., : k // 2], x[..., k // 2 :]
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin
