"""Scored eviction policies (h2o, l2) against a naive token-by-token reference, and bounded caches.

The reference states each policy directly, per batch row and head, with Python lists: the cache is
the list of stream positions kept so far; token p joins it and attends over it at slot positions
0, 1, ... (stream order); every ``evict_every`` tokens, if more than ``budget`` are cached, the
``n_recent`` most recent and the newest stay and the best-scored fill the rest (ties to the most recent).
"""

from __future__ import annotations

import math

import pytest
import torch
from einops import rearrange
from tolerance import assert_close

import memzoo
from memzoo.memories.h2o import H2OConfig
from memzoo.memories.kv import CachedAttention
from memzoo.memories.l2 import L2Config
from memzoo.ops.rope import apply_rope


def naive(module: CachedAttention, x: torch.Tensor) -> tuple[torch.Tensor, list[list[list[int]]]]:
    """x: [b, n, d] -> y: [b, n, d], and the stream positions kept at the end, per row and head."""
    cfg, h = module.config, module.n_heads
    B, P, R = cfg.budget, cfg.evict_every, module.policy.n_recent
    q, k, v = rearrange(module.qkv(x), "b n (three h k) -> three b h n k", three=3, h=h)
    out = torch.zeros_like(q)
    kept_all = []
    for bi in range(x.shape[0]):
        kept_all.append([])
        for hi in range(h):
            kept, acc = [], {}
            for p in range(x.shape[1]):
                kept.append(p)
                slots = torch.arange(len(kept))
                kp = apply_rope(k[bi : bi + 1, hi : hi + 1, kept], slots, module.rope_theta)[0, 0]  # [t, k]
                qp = apply_rope(q[bi : bi + 1, hi : hi + 1, p : p + 1], slots[-1:], module.rope_theta)[0, 0, 0]  # [k]
                att = (kp @ qp / math.sqrt(qp.shape[-1])).softmax(-1)
                out[bi, hi, p] = att @ v[bi, hi, kept]
                for j, a in zip(kept, att.tolist()):
                    acc[j] = acc.get(j, 0.0) + a
                if (p + 1) % P == 0 and len(kept) > B:
                    score = {j: acc[j] if isinstance(cfg, H2OConfig) else -k[bi, hi, j].norm().item() for j in kept}
                    score.update({j: math.inf for j in kept if j == p or j >= p + 1 - R})
                    kept = sorted(sorted(kept, key=lambda j: (score[j], j), reverse=True)[:B])
            kept_all[-1].append(kept)
    return module.out(rearrange(out, "b h n k -> b n (h k)")), kept_all


@pytest.mark.parametrize(
    "config",
    [
        H2OConfig(budget=12, evict_every=5),
        H2OConfig(budget=10, evict_every=7, n_recent=3),
        L2Config(budget=12, evict_every=5),
        L2Config(budget=9, evict_every=4, n_recent=0),
    ],
    ids=["h2o", "h2o-recent3", "l2", "l2-norecent"],
)
def test_selection_matches_naive(config):
    torch.manual_seed(0)
    module = CachedAttention(d_model=16, n_heads=2, config=config)
    x = torch.randn(2, 43, 16)
    with torch.no_grad():
        fast, state = module(x, module.init_state(2))
        ref, kept = naive(module, x)
    assert_close(fast, ref, n=config.budget + config.evict_every)  # a query attends over at most that many slots
    for bi in range(2):
        for hi in range(2):
            got = state.token_pos[bi, hi, : state.length][state.valid[bi, hi, : state.length]].tolist()
            assert got == kept[bi][hi]


def test_h2o_keeps_heavy_hitters_not_just_recent():
    """The selection differs from a window: some kept tokens are older than the recent window."""
    torch.manual_seed(0)
    module = CachedAttention(d_model=16, n_heads=2, config=H2OConfig(budget=12, evict_every=5))
    with torch.no_grad():
        _, state = module(torch.randn(1, 60, 16), module.init_state(1))
    assert (state.token_pos[..., : state.length] < 60 - 12).any()


@pytest.mark.parametrize("name", ["h2o", "l2", "namm"])
def test_cache_stays_within_budget(name):
    """200 segments of random sizes: at most budget + evict_every slots, at most budget kept after each eviction."""
    budget, every = 16, 8
    torch.manual_seed(0)
    model = memzoo.build(name, d_model=32, n_layers=1, n_heads=2, budget=budget, evict_every=every).eval()
    state = model.init_state(1)
    sizes = torch.randint(1, 12, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        for i, n in enumerate(sizes):
            state = model(torch.randint(3, 259, (1, n), generator=torch.Generator().manual_seed(i)), state=state).state
            cache = state.layers[0]
            assert cache.length <= budget + every
            kept = cache.valid.sum(-1)  # [b, h]
            assert int(kept.max()) <= budget + (cache.position % every)
    assert state.position == sum(sizes)


@pytest.mark.parametrize("name, extra", [("full", {}), ("window", dict(budget=16, evict_every=8))])
def test_short_conv_starts_as_identity_and_streams_split_invariant(name, extra):
    """conv_kernel: at init the model equals the same weights without the conv (warm starts begin
    unchanged); with learned taps, a stream cut into calls at arbitrary points equals one call
    (the conv's left context travels in the state, also across evictions)."""
    torch.manual_seed(0)
    kw = dict(d_model=32, n_layers=2, n_heads=2, **extra)
    with_conv = memzoo.build(name, conv_kernel=4, **kw).eval()
    plain = memzoo.build(name, **kw).eval()
    plain.load_state_dict({k: v for k, v in with_conv.state_dict().items() if not k.endswith(".conv")}, strict=True)
    ids = torch.randint(3, 259, (2, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(with_conv(ids).logits, plain(ids).logits, n=4 * 32, depth=2, scale="max")
        for name_, p in with_conv.named_parameters():
            if name_.endswith(".conv"):
                p.normal_(0.0, 0.5)
        one = with_conv(ids).logits
        assert not torch.allclose(one, plain(ids).logits, atol=1e-3)  # the taps matter
        state, pieces = with_conv.init_state(2), []
        for start, end in [(0, 3), (3, 11), (11, 12), (12, 50)]:
            out = with_conv(ids[:, start:end], state=state)
            state, pieces = out.state, pieces + [out.logits]
    assert_close(torch.cat(pieces, dim=1), one, n=4 * 32, depth=2, scale="max")
    assert state.layers[0].conv.shape == (2, 3, 3 * 32)


def test_short_conv_of_one_tap_is_refused():
    with pytest.raises(ValueError, match="conv_kernel"):
        memzoo.build("window", conv_kernel=1)


def test_streaming_writes_in_place_only_for_the_newest_state():
    """Without autograd a stream's newest state takes new tokens in place; any older state sharing the buffers
    copies first, so continuing it again gives exactly what it gave the first time, and its slots stay intact."""
    from memzoo.memories.kv import WindowConfig, writes_in_place

    torch.manual_seed(0)
    module = CachedAttention(d_model=16, n_heads=2, config=WindowConfig(budget=12, evict_every=5)).eval()
    with torch.no_grad():
        _, s0 = module(torch.randn(1, 7, 16), module.init_state(1))
        kept = s0.keys[:, :, : s0.length].clone()
        assert writes_in_place(s0)
        x = torch.randn(1, 2, 16)
        y1, s1 = module(x, s0)
        assert s1.keys.data_ptr() == s0.keys.data_ptr()  # written in place: no copy of the cache
        assert torch.equal(s0.keys[:, :, : s0.length], kept)  # the caller's slots untouched
        assert not writes_in_place(s0)  # s1 wrote past s0's length
        y2, s2 = module(x, s0)  # s0 continued a second time: copies
        assert s2.keys.data_ptr() != s0.keys.data_ptr()
        assert torch.equal(y1, y2)  # the same ops on the same inputs: bit for bit
        assert torch.equal(s0.keys[:, :, : s0.length], kept)
        assert not writes_in_place(s0.expand_batch(2))  # a copy without a frontier of its own
    assert not writes_in_place(s1)  # autograd on: a view of the buffers may be saved for backward


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_rotations_equal_rotating_every_key(dtype):
    """Streaming keeps each key's rotation from one call to the next; at every call they equal the keys rotated
    at their slots afresh (what training does), bit for bit: a slot's rotation depends on its key and slot alone."""
    from memzoo.memories.kv import WindowConfig

    torch.manual_seed(0)
    module = CachedAttention(d_model=16, n_heads=2, config=WindowConfig(budget=12, evict_every=5)).eval()
    state = module.init_state(1)
    with torch.no_grad():
        for n in (1, 3, 4, 2, 9, 1, 6):
            _, state = module(torch.randn(1, n, 16), state)
            kept, state = module._rotated_keys(state, dtype)
            fresh = apply_rope(state.keys[:, :, : state.length].to(dtype), torch.arange(state.length), module.rope_theta)
            assert kept.dtype == dtype and torch.equal(kept, fresh)
