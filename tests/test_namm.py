"""NAMM: naive vs batched features, the untrained scorer keeps everything, the evolution interface."""

from __future__ import annotations

import math

import pytest
import torch
from einops import rearrange
from tolerance import assert_close

import memzoo
from memzoo.memories.kv import CachedAttention
from memzoo.memories.namm import (
    D_ATTN,
    BAMScorer,
    NAMMConfig,
    key_redundancy,
    key_redundancy_naive,
    load_namm_parameters,
    namm_parameter_count,
    namm_parameters,
    redundancy_rule,
    save_namm_parameters,
    set_namm_parameters,
)
from memzoo.ops.rope import apply_rope
from memzoo.ops.stft import HOP, N_FFT, age_embedding, naive_spectral_ema, spectral_step, spectrogram

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
        assert_close(ema.double(), ref, dtype=torch.float32, n=N_FFT, depth=n // HOP)  # fp32 DFTs, one EMA term per frame


def test_spectrogram_is_torch_stfts_magnitude():
    """The frames-times-filters form gives torch.stft's numbers (fp64: only rounding differs)."""
    signal = torch.rand(3, 4, HOP * 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    window = torch.hann_window(N_FFT, periodic=True, dtype=torch.float64)
    ref = torch.stft(signal.reshape(-1, HOP * 9), N_FFT, HOP, window=window, center=False, onesided=True, return_complex=True).abs()
    assert_close(spectrogram(signal), ref.reshape(3, 4, *ref.shape[1:]), dtype=torch.float64, n=N_FFT)


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
    # the same columns, recorded one query at a time: attention over <= n keys, an EMA over n / HOP frames
    assert_close(module.policy.features(state_tbt), fast, n=n, depth=n // HOP, scale="max")

    emas = {}  # step position -> [b, h, j, f]
    for P in range(every, n + 1, every):
        per_token = [[[naive_spectral_ema(probs[b, h, :, j], P).tolist() for j in range(n)] for h in range(2)] for b in range(2)]
        emas[P] = torch.tensor(per_token, dtype=torch.float64)
    samples = torch.cat([emas[P][:, :, :P].flatten(1, 2) for P in emas], dim=1)  # [b, samples, f]: tokens cached at each step
    mean, std = samples.mean(1), samples.var(1, unbiased=False).sqrt()
    age = n - torch.arange(n).expand(2, 2, n)
    ref = torch.cat([age_embedding(age).double(), (emas[n] - mean[:, None, None]) / std[:, None, None]], dim=-1)
    # fp32 batched vs fp64 naive: attention over n keys, DFTs of N_FFT terms, n / HOP frames, then / std
    assert_close(fast.double(), ref, dtype=torch.float32, n=n, depth=n // HOP, scale="max")


def test_untrained_namm_is_a_full_cache():
    """Zero scorer, budget larger than the stream: the same outputs as ``full``."""
    full = memzoo.build("full", **TINY).eval()
    namm = memzoo.build("namm", **TINY, budget=256, evict_every=16).eval()
    missing, unexpected = namm.load_state_dict(full.state_dict(), strict=False)
    assert not unexpected and all(".scorer." in k for k in missing)
    x = ids(120)
    with torch.no_grad():
        out = namm(x)
        assert_close(out.logits, full(x).logits, n=120, depth=TINY["n_layers"])  # one call each; attention over 120 keys
    assert all(bool(layer.valid[..., :120].all()) and layer.length == 120 for layer in out.state.layers)


def test_untrained_namm_with_a_small_budget_is_a_window():
    """Zero scorer: every score ties at 0, the cap keeps the most recent, i.e. ``window``."""
    window = memzoo.build("window", **TINY, budget=16, evict_every=8).eval()
    namm = memzoo.build("namm", **TINY, budget=16, evict_every=8).eval()
    namm.load_state_dict(window.state_dict(), strict=False)
    x = ids(70)
    with torch.no_grad():
        assert_close(namm(x).logits, window(x).logits, n=24, depth=TINY["n_layers"])  # explicit vs SDPA attention over <= 24 slots


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
        assert_close(torch.cat(outs, 1), whole.logits, n=72, depth=TINY["n_layers"])  # attention over <= budget + evict_every slots
        state = model.init_state(2)
        for p in range(67):
            out = model(x[:, p : p + 1], state=state)
            state = out.state
        assert_close(out.logits[:, 0], whole.logits[:, -1], n=72, depth=TINY["n_layers"])
    kept = [int(layer.valid.sum()) for layer in whole.state.layers]
    assert min(kept) < 2 * 2 * 64, kept  # fewer than the budget allows: the threshold evicted


def test_bam_mask_is_backward():
    """A token's score depends only on itself and newer tokens."""
    scorer = BAMScorer()
    set_namm_parameters(scorer, random_vector(1))
    x, valid = torch.randn(1, 12, 25), torch.ones(1, 12, dtype=torch.bool)  # seeded by the suite's fixture
    y = x.clone()
    y[0, 6] += 1.0
    a, b = scorer(x, valid), scorer(y, valid)
    # exact: rows 7.. never see row 6 (masked scores are exactly 0 after softmax), and every linear map
    # is row by row, so the same ops run on the same numbers in the same order
    torch.testing.assert_close(a[:, 7:], b[:, 7:], atol=0, rtol=0)
    assert not torch.allclose(a[:, :7], b[:, :7])
    # holes take the explicit-mask path: a hole is seen by no one, so appending one changes no score
    with_hole = scorer(torch.cat([x, torch.randn(1, 1, 25)], 1), torch.cat([valid, torch.zeros(1, 1, dtype=torch.bool)], 1))
    # explicit-mask attention vs SDPA's causal kernel: other rounding, in 3 maps of <= 32 terms, at the scores' scale
    assert_close(with_hole[:, :12], a, n=D_ATTN, depth=3, scale="max")


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
    save_namm_parameters(tmp_path / "scorer" / "namm.safetensors", vec)  # a scorer folder, as evolution ships it
    assert torch.equal(load_namm_parameters(tmp_path / "scorer"), vec)
    with pytest.raises(FileNotFoundError, match="scorer folder"):
        load_namm_parameters(tmp_path / "nowhere")
    model.save_pretrained(tmp_path / "ckpt")
    assert torch.equal(load_namm_parameters(tmp_path / "ckpt"), vec)
    assert torch.equal(namm_parameters(memzoo.load(tmp_path / "ckpt")), vec)

    with pytest.raises(ValueError, match="has 4172 entries .25 features., got 10"):
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


# ------------------------------------------------------------------------- eviction vs a naive reference
def naive_namm_stream(module: CachedAttention, x: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
    """NAMM eviction token by token in fp64, with every token's state its own (the paper's semantics).

    Each head's cache is a list of stream positions with their slots. A query at slot s attends
    over the cached tokens at their slots (RoPE) and itself; each token's attention column over
    the whole stream is kept (zero before it arrived), so its EMA is :func:`naive_spectral_ema`
    of its own column and nothing else. At each step (stream position P, a multiple of
    ``evict_every``): moments over every (head, token) sample of every step so far, features,
    BAM scores per head in stream order, keep iff score >= 0 (the newest always), at most
    ``budget`` (highest score first, ties to the most recent); kept tokens move to slots 0, 1, ...
    and new tokens go to the next slot after the fullest head.

    Returns:
        the outputs [b, n, d] (fp64) and, per step: the positions cached before and kept after it
        per (b, h), the features per (b, h, position), and the smallest margin of a decision
        (|score| at the threshold, the score gap at the cap).
    """
    cfg, policy, H = module.config, module.policy, module.n_heads
    scorer = BAMScorer().double()
    scorer.load_state_dict(policy.scorer.state_dict())
    B, n, _ = x.shape
    w = {k: p.double() for k, p in module.state_dict().items() if not k.startswith("policy.")}
    q, k, v = rearrange(x.double() @ w["qkv.weight"].T, "b n (three h k) -> three b h n k", three=3, h=H)
    rope = lambda t, s: apply_rope(t[None, None, None], torch.tensor([s]), module.rope_theta)[0, 0, 0].double()  # noqa: E731
    cache = [[[] for _ in range(H)] for _ in range(B)]  # per (b, h): [(position, slot)] in stream order
    cols = torch.zeros(B, H, n, n, dtype=torch.float64)  # [b, h, token, query]
    out = torch.zeros(B, H, n, k.shape[-1], dtype=torch.float64)
    length, samples, steps = 0, [[] for _ in range(B)], []
    for p in range(n):
        for b in range(B):
            for h in range(H):
                cache[b][h].append((p, length))
                keys = torch.stack([rope(k[b, h, j], s) for j, s in cache[b][h]])
                att = (keys @ rope(q[b, h, p], length) / math.sqrt(k.shape[-1])).softmax(-1)
                out[b, h, p] = att @ v[b, h, [j for j, _ in cache[b][h]]]
                cols[b, h, [j for j, _ in cache[b][h]], p] = att
        length += 1
        P = p + 1
        if P % cfg.evict_every:
            continue
        step = {"cached": {}, "kept": {}, "features": {}, "margin": float("inf")}
        emas = {(b, h, j): naive_spectral_ema(cols[b, h, j], P) for b in range(B) for h in range(H) for j, _ in cache[b][h]}
        for b in range(B):
            samples[b] += [e for (bb, _, _), e in emas.items() if bb == b]
        kept_counts = []
        for b in range(B):
            s = torch.stack(samples[b])
            mean, std = s.mean(0), s.var(0, unbiased=False).sqrt().clamp_min(1e-6)
            for h in range(H):
                pos = [j for j, _ in cache[b][h]]
                feats = torch.stack([torch.cat([age_embedding(torch.tensor(P - j)).double(), (emas[b, h, j] - mean) / std]) for j in pos])
                with torch.no_grad():
                    score = scorer(feats[None], torch.ones(1, len(pos), dtype=torch.bool))[0]
                step["features"].update({(b, h, j): f for j, f in zip(pos, feats)})
                step["cached"][b, h] = pos
                keep = [i for i in range(len(pos)) if score[i] >= 0 or pos[i] == P - 1]
                step["margin"] = min(step["margin"], *(abs(float(score[i])) for i in range(len(pos)) if pos[i] != P - 1))
                if len(keep) > cfg.budget:
                    ranked = sorted(keep, key=lambda i: (float("inf") if pos[i] == P - 1 else float(score[i]), pos[i]), reverse=True)
                    sc = [float(score[i]) for i in ranked if pos[i] != P - 1]
                    step["margin"] = min(step["margin"], abs(sc[cfg.budget - 2] - sc[cfg.budget - 1]))
                    keep = sorted(ranked[: cfg.budget])
                cache[b][h] = [(pos[i], slot) for slot, i in enumerate(keep)]
                step["kept"][b, h] = [pos[i] for i in keep]
                kept_counts.append(len(keep))
        length = max(kept_counts)
        steps.append(step)
    y = rearrange(out, "b h n k -> b n (h k)") @ w["out.weight"].T
    return y, steps


def test_eviction_below_the_cap_matches_the_naive_reference(monkeypatch):
    """Threshold evictions leave heads below the cap, so new tokens reuse freed slots: every per-slot
    tensor must have moved with its token or been cleared, and features, kept sets and outputs
    equal a token-by-token fp64 reference in which each token's state is its own."""
    every, n, budget = 16, 16 * 7, 28
    module = CachedAttention(d_model=16, n_heads=2, config=NAMMConfig(budget=budget, evict_every=every))
    set_namm_parameters(module.policy.scorer, random_vector(3, scale=0.3))
    x = torch.randn(2, n, 16)
    seen = []  # per step: (token_pos, valid, features) as the fast form scores them
    score = module.policy.score

    def recording_score(cache):
        L = cache.length
        seen.append((cache.token_pos[:, :, :L].clone(), cache.valid[:, :, :L].clone(), module.policy.features(cache)))
        return score(cache)

    monkeypatch.setattr(module.policy, "score", recording_score)
    with torch.no_grad():
        fast, state = module(x, module.init_state(2))
        ref, steps = naive_namm_stream(module, x)
    assert len(seen) == len(steps) == n // every
    # well-posed: no decision within rounding of its boundary (fp32 scores vs fp64)
    assert min(s["margin"] for s in steps) > 1e-3
    # the case that matters: the fullest head kept fewer than the cap, so new tokens fill freed slots
    assert any(max(map(len, s["kept"].values())) < min(budget, max(map(len, s["cached"].values()))) for s in steps)
    for (token_pos, valid, feats), step in zip(seen, steps):
        for (b, h), cached in step["cached"].items():
            slots = valid[b, h].nonzero()[:, 0]
            assert token_pos[b, h, slots].tolist() == cached
            ref_feats = torch.stack([step["features"][b, h, j] for j in cached])
            # fp32 STFT (32-term DFTs) and EMA over the stream's frames, then divided by stds of ~1e-2
            assert_close(feats[b, h, slots].double(), ref_feats, dtype=torch.float32, n=N_FFT, depth=n // HOP, scale="max")
    final = {(b, h): layer for b in range(2) for h in range(2) for layer in [state.token_pos[b, h][state.valid[b, h]].tolist()]}
    assert final == steps[-1]["kept"]
    assert_close(fast.double(), ref, dtype=torch.float32, n=budget + every, depth=n // every)


def test_shipped_scorer_folder_loads_by_its_path():
    """``EvictingCache("namm", ..., scorer="checkpoints/namm-scorer")``: the folder, not only the file inside it."""
    from pathlib import Path

    import memzoo.hf as mh

    folder = Path(__file__).parents[1] / "checkpoints" / "namm-scorer"
    vec = load_namm_parameters(folder / "namm.safetensors")
    assert vec.abs().sum() > 0  # an evolved scorer, not the zero init
    assert torch.equal(mh.namm_parameters(mh.EvictingCache("namm", 64, scorer=str(folder))), vec)


# ------------------------------------------------------------------------- key redundancy (documented option)
def test_key_redundancy_matches_naive():
    """Holes and every pair's order by stream position; fp32 normalised dot products of k terms."""
    keys = torch.randn(2, 3, 11, 8)
    keys[0, 1, 7] = keys[0, 1, 2] * 3.0  # a copy (another norm): cosine 1
    valid = torch.rand(2, 3, 11) > 0.2
    valid[..., -1] = valid[0, 1, 2] = valid[0, 1, 7] = True
    token_pos = torch.arange(11).expand(2, 3, 11) * 5
    fast = key_redundancy(keys, valid, token_pos)
    assert_close(fast.double(), key_redundancy_naive(keys, valid, token_pos), dtype=torch.float32, n=8)
    assert fast[0, 1, 2] > 1 - 1e-5  # its copy is newer
    assert torch.all(fast[..., -1] == -1) and torch.all(fast[~valid] == -1)  # nothing newer / holes


def repeated_stream(n_repeats: int, period: int, d: int = 16) -> tuple[torch.Tensor, int]:
    """[1, n, d]: one unique vector at position ``period``, inside a block of ``period`` vectors repeated."""
    g = torch.Generator().manual_seed(0)
    block = torch.randn(period, d, generator=g)
    x = block.repeat(n_repeats, 1)
    x[period] = torch.randn(d, generator=g) * 3
    return x[None], period


def test_redundancy_rule_keeps_the_unique_token_and_drops_old_copies():
    """Repeated content keeps only its latest copy; the one unique token survives far beyond the window."""
    module = CachedAttention(d_model=16, n_heads=2, config=NAMMConfig(budget=24, evict_every=8, key_redundancy=True))
    set_namm_parameters(module.policy.scorer, redundancy_rule(0.95))
    x, unique = repeated_stream(n_repeats=20, period=6)
    with torch.no_grad():
        _, state = module(x, module.init_state(1))
    for h in range(2):
        kept = state.token_pos[0, h][state.valid[0, h]].tolist()
        assert unique in kept, kept
        n = x.shape[1]
        assert all(p >= n - 6 - 8 or p == unique for p in kept), kept  # one copy of the block (+ the newest piece)


def test_n_recent_always_keeps_the_recent_window():
    module = CachedAttention(d_model=16, n_heads=2, config=NAMMConfig(budget=32, evict_every=8, n_recent=12))
    vector = torch.zeros(namm_parameter_count())
    vector[-1] = -1.0  # head bias: every score -1, so the scorer alone would evict everything but the newest
    set_namm_parameters(module.policy.scorer, vector)
    with torch.no_grad():
        _, state = module(torch.randn(1, 40, 16), module.init_state(1))
    for h in range(2):
        assert state.token_pos[0, h][state.valid[0, h]].tolist() == list(range(40 - 12, 40))


def test_key_redundancy_namm_is_split_invariant_and_checks_its_vector():
    model = memzoo.build("namm", **TINY, budget=24, evict_every=8, key_redundancy=True, n_recent=4).eval()
    set_namm_parameters(model, redundancy_rule(0.5))
    x = ids(61, b=2)
    with torch.no_grad():
        whole = model(x).logits
        state, outs = model.init_state(2), []
        for start, end in zip([0, 3, 17, 40], [3, 17, 40, 61]):
            out = model(x[:, start:end], state=state)
            state, outs = out.state, outs + [out.logits]
    assert_close(torch.cat(outs, 1), whole, n=32, depth=TINY["n_layers"])  # attention over <= 32 slots
    with pytest.raises(ValueError, match="4335 entries .26 features., got 4172.*key_redundancy"):
        set_namm_parameters(model, torch.zeros(namm_parameter_count()))
    with pytest.raises(ValueError, match="n_recent must be an int in"):
        NAMMConfig(budget=8, n_recent=9)
