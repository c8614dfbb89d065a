"""``l2``: keep the tokens whose keys have the lowest L2 norm, plus a recent window.

A key's norm is fixed when the token arrives, so the policy needs no state and no attention
probabilities (it works with flash attention). RoPE rotates pairs of dimensions and keeps the norm,
so rotated (hf cache) and un-rotated (memzoo cache) keys give the same scores.

Reference: Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression"
(arXiv 2406.11430): keep the keys with the lowest L2 norm.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..registry import register
from .kv import EvictionPolicy, KVCacheState, RecentWindowConfig, protect_recent

__all__ = ["L2Config", "LowKeyNorm"]


class LowKeyNorm(EvictionPolicy):
    """Score = minus the key's L2 norm; the ``n_recent`` most recent tokens always stay.

    Args:
        n_recent: size of the protected recent window (stream tokens).
    """

    def __init__(self, n_recent: int):
        super().__init__()
        self.n_recent = n_recent

    def score(self, cache: KVCacheState) -> Tensor:
        norms = cache.keys[:, :, : cache.length].float().norm(dim=-1)  # [b, h, L]
        return protect_recent(-norms, cache, self.n_recent)


@dataclass
class L2Config(RecentWindowConfig):
    """``l2``: lowest key norm plus a recent window (arXiv 2406.11430).

    ``n_recent`` None = an eighth of the budget (a memzoo choice: the paper scores every token, but
    the local context is what a decoder needs most).
    """

    def make_policy(self) -> LowKeyNorm:
        return LowKeyNorm(self.recent(self.budget // 8))


@register("l2")
def l2() -> L2Config:
    return L2Config()
