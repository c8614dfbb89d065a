"""CachedAttention against a naive token-by-token reference of what each token may see.

The reference states the eviction semantics directly: with period P and budget B, the last
eviction before stream position p happened at E = floor(p / P) * P, and it kept the B most recent
tokens (``window``) or the first n_sinks plus the most recent (``sinks``); token p attends over
those and every token since E, at slot positions 0, 1, ... in stream order.
"""

from __future__ import annotations

import math

import pytest
import torch
from einops import rearrange
from tolerance import assert_close

from memzoo.memories.kv import CachedAttention, FullConfig, SinksConfig, WindowConfig
from memzoo.ops.rope import apply_rope


def visible(p: int, config) -> list[int]:
    """Stream positions token p attends to (itself included)."""
    if not hasattr(config, "budget"):
        return list(range(p + 1))
    P, B = config.evict_every, config.budget
    E = (p // P) * P
    if E <= B:
        return list(range(p + 1))
    sinks = list(range(config.n_sinks)) if isinstance(config, SinksConfig) else []
    return sinks + list(range(E - (B - len(sinks)), p + 1))


def naive(module: CachedAttention, x: torch.Tensor) -> torch.Tensor:
    """x: [b, n, d] -> y: [b, n, d], one token at a time."""
    h = module.n_heads
    q, k, v = rearrange(module.qkv(x), "b n (three h k) -> three b h n k", three=3, h=h)
    outs = []
    for p in range(x.shape[1]):
        seen = visible(p, module.config)
        slots = torch.arange(len(seen))
        kp = apply_rope(k[:, :, seen], slots, module.rope_theta)  # [b, h, |V|, k]
        qp = apply_rope(q[:, :, p : p + 1], slots[-1:], module.rope_theta)  # [b, h, 1, k]
        att = (qp @ kp.transpose(-1, -2) / math.sqrt(qp.shape[-1])).softmax(-1)
        outs.append(att @ v[:, :, seen])
    return module.out(rearrange(torch.cat(outs, dim=2), "b h n k -> b n (h k)"))


@pytest.mark.parametrize(
    "config",
    [FullConfig(), WindowConfig(budget=12, evict_every=5), SinksConfig(budget=12, evict_every=5, n_sinks=3)],
    ids=["full", "window", "sinks"],
)
def test_cached_attention_matches_naive(config):
    torch.manual_seed(0)
    module = CachedAttention(d_model=16, n_heads=2, config=config)
    x = torch.randn(2, 43, 16)
    with torch.no_grad():
        fast, state = module(x, module.init_state(2))
        assert_close(fast, naive(module, x), n=x.shape[1])  # a query attends over at most the 43 tokens
    if hasattr(config, "budget"):
        assert state.length <= config.budget + config.evict_every


def test_positions_stay_within_the_cache():
    """The largest slot position ever used is budget + evict_every - 1, however long the stream."""
    config = WindowConfig(budget=8, evict_every=4)
    module = CachedAttention(d_model=8, n_heads=1, config=config)
    state = module.init_state(1)
    with torch.no_grad():
        for _ in range(50):
            _, state = module(torch.randn(1, 3, 8), state)
            assert state.length <= 12
            assert state.valid[:, :, : state.length].all()
    kept = state.token_pos[0, 0, : state.length]
    assert torch.equal(kept, torch.arange(150 - state.length, 150))  # the most recent, in order
