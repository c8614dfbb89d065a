"""NAMM: naive vs batched features, the untrained scorer keeps everything, the evolution interface."""

from __future__ import annotations

import math

import pytest
import torch
from einops import rearrange

import memzoo
from memzoo.memories.kv import CachedAttention
from memzoo.memories.namm import (
    BAMScorer,
    NAMMConfig,
    load_namm_parameters,
    namm_parameter_count,
    namm_parameters,
    save_namm_parameters,
    set_namm_parameters,
)
from memzoo.ops.rope import apply_rope
from memzoo.ops.stft import HOP, age_embedding, naive_spectral_ema, spectral_step

TINY = dict(d_model=32, n_layers=2, n_heads=2)


def ids(n: int, seed: int = 0, b: int = 1) -> torch.Tensor:
    return torch.randint(3, 259, (b, n), generator=torch.Generator().manual_seed(seed))


def random_vector(seed: int = 0, scale: float = 0.5) -> torch.Tensor:
    return torch.randn(namm_parameter_count(), generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("every", [48, 40, 8])
def test_spectral_step_matches_naive(every):
    """The buffered STFT/EMA step equals the per-token formula, for rhythms on and off the hop."""
    n = 200
    cols = torch.rand(5, n, generator=torch.Generator().manual_seed(0))
    width = every + 2 * HOP - math.gcd(every, HOP)
    signal, ema, base = torch.zeros(5, width), torch.zeros(5, 17), -HOP
    for P in range(every, n + 1, every):
        signal[:, P - every - base : P - base] = cols[:, P - every : P]
        ema, signal, dropped = spectral_step(signal, ema, P - base)
        base += dropped
        ref = torch.stack([naive_spectral_ema(c, P) for c in cols])
        torch.testing.assert_close(ema.double(), ref, atol=1e-5, rtol=1e-5)


def full_attention_columns(module: CachedAttention, x: torch.Tensor) -> torch.Tensor:
    """[b, h, n, n] causal attention probabilities of a cache that never evicted (slots = stream positions)."""
    q, k, _ = rearrange(module.qkv(x), "b n (three h k) -> three b h n k", three=3, h=module.n_heads)
    pos = torch.arange(x.shape[1])
    q, k = apply_rope(q, pos, module.rope_theta), apply_rope(k, pos, module.rope_theta)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return scores.masked_fill(pos[None, :] > pos[:, None], float("-inf")).softmax(-1)


def test_features_match_naive_end_to_end():
    """The policy's 25 features after 64 tokens (2 steps of 32) equal a per-token recomputation.

    Naive: each token's EMA from its whole attention column; the normalisation statistics over every
    (head, token) sample of every step at once (two-pass); the age embedding from the stream position.
    """
    torch.manual_seed(0)
    every, n = 32, 64
    module = CachedAttention(d_model=16, n_heads=2, config=NAMMConfig(budget=1000, evict_every=every))
    x = torch.randn(2, n, 16)
    with torch.no_grad():
        _, state = module(x, module.init_state(2))
        _, state_tbt = module(x[:, :1], module.init_state(2))
        for p in range(1, n):
            _, state_tbt = module(x[:, p : p + 1], state_tbt)
        probs = full_attention_columns(module, x).double()  # [b, h, q, j]
    fast = module.policy.features(state)  # [b, h, n, 25]
    torch.testing.assert_close(module.policy.features(state_tbt), fast, atol=1e-5, rtol=1e-5)

    emas = {}  # step position -> [b, h, j, f]
    for P in range(every, n + 1, every):
        per_token = [[[naive_spectral_ema(probs[b, h, :, j], P).tolist() for j in range(n)] for h in range(2)] for b in range(2)]
        emas[P] = torch.tensor(per_token, dtype=torch.float64)
    samples = torch.cat([emas[P][:, :, :P].flatten(1, 2) for P in emas], dim=1)  # [b, samples, f]: tokens cached at each step
    mean, std = samples.mean(1), samples.var(1, unbiased=False).sqrt()
    age = n - torch.arange(n).expand(2, 2, n)
    ref = torch.cat([age_embedding(age).double(), (emas[n] - mean[:, None, None]) / std[:, None, None]], dim=-1)
    err = (fast.double() - ref).abs().max().item()
    assert err < 1e-4, err  # fp32 batched vs fp64 naive, after dividing by stds of ~1e-2


def test_untrained_namm_is_a_full_cache():
    """Zero scorer, budget larger than the stream: the same outputs as ``full``."""
    full = memzoo.build("full", **TINY).eval()
    namm = memzoo.build("namm", **TINY, budget=256, evict_every=16).eval()
    missing, unexpected = namm.load_state_dict(full.state_dict(), strict=False)
    assert not unexpected and all(".scorer." in k for k in missing)
    x = ids(120)
    with torch.no_grad():
        out = namm(x)
        torch.testing.assert_close(out.logits, full(x).logits, atol=1e-5, rtol=1e-5)
    assert all(bool(layer.valid[..., :120].all()) and layer.length == 120 for layer in out.state.layers)


def test_untrained_namm_with_a_small_budget_is_a_window():
    """Zero scorer: every score ties at 0, the cap keeps the most recent, i.e. ``window``."""
    window = memzoo.build("window", **TINY, budget=16, evict_every=8).eval()
    namm = memzoo.build("namm", **TINY, budget=16, evict_every=8).eval()
    namm.load_state_dict(window.state_dict(), strict=False)
    x = ids(70)
    with torch.no_grad():
        torch.testing.assert_close(namm(x).logits, window(x).logits, atol=1e-5, rtol=1e-5)


def test_evolved_scorer_evicts_and_stays_split_invariant():
    """A nonzero scorer drops tokens (score < 0) below the budget; one call == random cuts == token by token."""
    model = memzoo.build("namm", **TINY, budget=64, evict_every=8).eval()
    set_namm_parameters(model, random_vector())
    x = ids(67, b=2)
    with torch.no_grad():
        whole = model(x)
        state, outs = model.init_state(2), []
        for start, end in zip([0, 5, 6, 19, 40, 41], [5, 6, 19, 40, 41, 67]):
            out = model(x[:, start:end], state=state)
            state = out.state
            outs.append(out.logits)
        torch.testing.assert_close(torch.cat(outs, 1), whole.logits, atol=1e-5, rtol=1e-5)
        state = model.init_state(2)
        for p in range(67):
            out = model(x[:, p : p + 1], state=state)
            state = out.state
        torch.testing.assert_close(out.logits[:, 0], whole.logits[:, -1], atol=1e-5, rtol=1e-5)
    kept = [int(layer.valid.sum()) for layer in whole.state.layers]
    assert min(kept) < 2 * 2 * 64, kept  # fewer than the budget allows: the threshold evicted


def test_bam_mask_is_backward():
    """A token's score depends only on itself and newer tokens."""
    scorer = BAMScorer()
    set_namm_parameters(scorer, random_vector(1))
    x, valid = torch.randn(1, 12, 25), torch.ones(1, 12, dtype=torch.bool)
    y = x.clone()
    y[0, 6] += 1.0
    a, b = scorer(x, valid), scorer(y, valid)
    torch.testing.assert_close(a[:, 7:], b[:, 7:], atol=0, rtol=0)
    assert not torch.allclose(a[:, :7], b[:, :7])
    # holes take the explicit-mask path: a hole is seen by no one, so appending one changes no score
    with_hole = scorer(torch.cat([x, torch.randn(1, 1, 25)], 1), torch.cat([valid, torch.zeros(1, 1, dtype=torch.bool)], 1))
    torch.testing.assert_close(with_hole[:, :12], a, atol=1e-6, rtol=1e-5)


def test_parameter_vector_interface(tmp_path):
    model = memzoo.build("namm", **TINY, budget=16, evict_every=8)
    assert namm_parameter_count() == 4172
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".scorer." in n)
    assert torch.equal(namm_parameters(model), torch.zeros(4172))
    vec = random_vector(2)
    set_namm_parameters(model, vec.numpy())  # a CMA-ES candidate is a numpy array
    assert torch.equal(namm_parameters(model), vec)
    scorers = [blk.mixer.policy.scorer for blk in model.blocks]
    assert all(torch.equal(torch.nn.utils.parameters_to_vector(s.parameters()), vec) for s in scorers)

    save_namm_parameters(tmp_path / "best.safetensors", vec)
    assert torch.equal(load_namm_parameters(tmp_path / "best.safetensors"), vec)
    model.save_pretrained(tmp_path / "ckpt")
    assert torch.equal(load_namm_parameters(tmp_path / "ckpt"), vec)
    assert torch.equal(namm_parameters(memzoo.load(tmp_path / "ckpt")), vec)

    with pytest.raises(ValueError, match="4172 entries"):
        set_namm_parameters(model, torch.zeros(10))
    with pytest.raises(ValueError, match="no NAMM scorer"):
        namm_parameters(memzoo.build("window", **TINY))
    with torch.no_grad():
        scorers[1].head_bias.add_(1.0)
    with pytest.raises(ValueError, match="differ"):
        namm_parameters(model)


def test_bench_recipe_smoke():
    """recipes/bench_namm.py at a tiny size: one result per policy, with NAMM's time split by method."""
    import argparse
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_namm", Path(__file__).parents[1] / "recipes" / "bench_namm.py")
    bench_namm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_namm)
    args = argparse.Namespace(d_model=32, n_layers=1, n_heads=2, budget=32, evict_every=16, segment_len=32, repeats=1, decode=2)
    result = bench_namm.bench("namm-evolved", args, ids(128))
    assert result["tokens_per_s"] > 0 and set(result["policy_seconds"]) == {"observe", "before_eviction", "score"}
