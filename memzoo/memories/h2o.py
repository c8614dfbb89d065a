"""``h2o``: keep the heavy hitters (most accumulated attention) plus a recent window.

Every cached token accumulates the attention probability that every query so far gave it; at each
eviction the ``n_recent`` most recent tokens stay, and the rest of the budget goes to the tokens
with the largest accumulated attention. The sum is a per-slot policy tensor, so it moves with its
token when the cache is compacted.

Reference: Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
Language Models" (arXiv 2306.14048): the heavy-hitter eviction algorithm, with the budget split
evenly between heavy hitters and recent tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..interface import MemoryState
from ..registry import register
from .kv import EvictionPolicy, KVCacheState, RecentWindowConfig, protect_recent

__all__ = ["H2OConfig", "H2OState", "HeavyHitters"]


@dataclass
class H2OState(MemoryState):
    """Attributes:
    acc: [b, h, C] attention accumulated by each slot's token over every query so far (fp32).
    """

    acc: Tensor


class HeavyHitters(EvictionPolicy):
    """Score = accumulated attention; the ``n_recent`` most recent tokens always stay.

    Args:
        n_recent: size of the protected recent window (stream tokens).
    """

    needs_attention = True

    def __init__(self, n_recent: int):
        super().__init__()
        self.n_recent = n_recent

    def init_state(self, batch_size: int, n_heads: int, capacity: int, device) -> H2OState:
        return H2OState(acc=torch.zeros(batch_size, n_heads, capacity, device=device))

    def observe(self, cache: KVCacheState, probs: Tensor, n_new: int) -> H2OState:
        # probs: [b, h, n_new, L]; selection is discrete, so no gradient flows through the statistics
        acc, L = cache.policy.acc, probs.shape[-1]
        return H2OState(acc=acc.slice_scatter(acc[:, :, :L] + probs.detach().float().sum(2), dim=2, start=0, end=L))

    def score(self, cache: KVCacheState) -> Tensor:
        return protect_recent(cache.policy.acc[:, :, : cache.length], cache, self.n_recent)


@dataclass
class H2OConfig(RecentWindowConfig):
    """``h2o``: accumulated-attention heavy hitters plus a recent window (arXiv 2306.14048).

    ``n_recent`` None = half the budget, the paper's split.
    """

    def make_policy(self) -> HeavyHitters:
        return HeavyHitters(self.recent(self.budget // 2))


@register("h2o")
def h2o() -> H2OConfig:
    return H2OConfig()
