"""Infini-attention: the batched op and the module against the naive reference, and the memory's maths.

The conformance suite (tests/test_interface.py) already checks split invariance, causality, bounded
state, detach and save/load for ``infini`` and ``infini-linear``; this file checks the maths.
"""

from __future__ import annotations

import sys

import pytest
import torch
from einops import einsum, rearrange
from tolerance import assert_close

from memzoo import MemZooConfig
from memzoo.memories.infini import InfiniAttention, InfiniConfig, InfiniState
from memzoo.ops.infini import (
    MemoryRule,
    gate_mix,
    infini_attention,
    infini_attention_naive,
    local_attention,
    memory_read,
    memory_write,
    sigma,
)

RULES = ["delta", "linear"]  # the paper's two (registry names infini and infini-linear)

#: every combination the memory's rule allows: the paper's, and the additions (unit keys, no normaliser, DeltaNet)
MEMORY_RULES = {
    "delta": MemoryRule(),
    "linear": MemoryRule(update_rule="linear"),
    "delta-unnormalised": MemoryRule(normalize=False),
    "linear-l2": MemoryRule(update_rule="linear", feature_map="silu-l2", normalize=False),
    "delta-l2": MemoryRule(update_rule="delta", feature_map="silu-l2", normalize=False),
    "deltanet": MemoryRule(update_rule="deltanet", feature_map="silu-l2", normalize=False),
}

#: infini-deltanet's additions one at a time, and all of them (the registry name)
VARIANTS = {
    "strength": dict(write_strength=True),
    "conv": dict(conv_kernel=4),
    "add": dict(mix="add"),
    "deltanet": dict(update_rule="deltanet", feature_map="silu-l2", normalize=False),
    "infini-deltanet": dict(update_rule="deltanet", feature_map="silu-l2", normalize=False, write_strength=True, conv_kernel=4, mix="add"),
}
VARIANTS["decay"] = VARIANTS["infini-deltanet"] | dict(decay=True)  # Gated DeltaNet's decay on top


def make_module(segment_len: int = 8, d_model: int = 32, n_heads: int = 2, dtype=torch.float32, **knobs) -> InfiniAttention:
    torch.manual_seed(0)
    module = InfiniConfig(segment_len=segment_len, **knobs).build_module(MemZooConfig(d_model=d_model, n_heads=n_heads), 0)
    with torch.no_grad():
        if module.beta is not None:
            module.beta.copy_(torch.randn(n_heads))  # a gate away from 0.5, so that a swapped mix would show
        for extra in (module.mem_out, module.strength, module.decay):
            if extra is not None:  # away from their init (0, 0.5, ~1): a wrong path would show
                for p in extra.parameters():
                    p.normal_(std=0.3)
        if module.conv is not None:
            module.conv.normal_(std=0.3)
    return module.to(dtype)


def split_heads(module: InfiniAttention, x: torch.Tensor):
    """q, k, v [b, h, n, k] exactly as the module makes them (from a stream's start)."""
    return module._project(x, module.init_state(x.shape[0], dtype=x.dtype))[:3]


def project_out(module: InfiniAttention, a: torch.Tensor) -> torch.Tensor:
    """The module's output projection of the heads' reads a [b, h, n, v] (or [..., 2v] without a gate)."""
    if module.mem_out is None:
        return module.out(rearrange(a, "b h n v -> b n (h v)"))
    a_dot, a_mem = a.chunk(2, dim=-1)
    return module.out(rearrange(a_dot, "b h n v -> b n (h v)")) + module.mem_out(rearrange(a_mem, "b h n v -> b n (h v)"))


def run(module: InfiniAttention, x: torch.Tensor, cuts=(), state=None):
    """Module outputs of x [b, n, d] fed in pieces ending at ``cuts``, and the final state."""
    state = state if state is not None else module.init_state(x.shape[0], dtype=x.dtype)
    outs, start = [], 0
    for end in [*cuts, x.shape[1]]:
        y, state = module(x[:, start:end], state)
        outs.append(y)
        start = end
    return torch.cat(outs, dim=1), state


def qkv(b=2, h=2, n=67, k=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, k, generator=g, dtype=dtype) for _ in range(3)]


# ------------------------------------------------------------------------- op: naive vs batched
@pytest.mark.parametrize("strength", [False, True], ids=["b=1", "b_t"])
@pytest.mark.parametrize("name", MEMORY_RULES)
def test_op_batched_matches_naive(name, strength):
    """8 complete segments plus a 3-token tail, from an empty and from a non-empty memory (fp32), with
    the gate and without it (the two reads side by side), every token writing with strength 1 or b_t.

    The memory is one running sum over the 64 written tokens (the delta rules subtract what M already
    returns, which damps earlier rounding rather than compounding it; DeltaNet's triangular solve is
    a reduction over the segment's 8 tokens per write): n = 64, depth 1.
    """
    rule = MEMORY_RULES[name]
    q, k, v = qkv(n=8 * 8 + 3)
    beta = torch.randn(2, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    b = torch.rand(2, 2, 8 * 8 + 3, generator=g) if strength else None
    empty = (torch.zeros(2, 2, 8, 8), torch.zeros(2, 2, 8))
    full = (torch.randn(2, 2, 8, 8, generator=g), torch.rand(2, 2, 8, generator=g) * 50 + 1)
    for M0, z0 in (empty, full):
        for gate in (beta, None):
            ref, M_ref, z_ref = infini_attention_naive(q, k, v, M0, z0, gate, segment_len=8, rule=rule, strength=b)
            out, M, z = infini_attention(q, k, v, M0, z0, gate, segment_len=8, rule=rule, strength=b)
            assert out.shape[-1] == (8 if gate is not None else 16)
            assert_close(out, ref, n=64)
            assert_close(M, M_ref, n=64, scale="max")  # sums of 64 outer products: they cancel
            assert_close(z, z_ref, n=64, scale="max")  # sums of positive terms (ELU + 1), or of either sign (SiLU-L2)


def test_deltanet_sub_chunks_equal_the_token_by_token_recurrence(monkeypatch):
    """A segment of 8 written as sub-chunks of 3, 3 and 2 (+1 padding token) equals the naive
    token-by-token recurrence, as one sub-chunk of 8 does (fp32; n = 64 written tokens)."""
    import memzoo.ops.infini as ops

    rule = MEMORY_RULES["deltanet"]
    q, k, v = qkv(n=8 * 8)
    b = torch.rand(2, 2, 64, generator=torch.Generator().manual_seed(9))
    M0, z0 = torch.zeros(2, 2, 8, 8), torch.zeros(2, 2, 8)
    ref, M_ref, _ = infini_attention_naive(q, k, v, M0, z0, None, segment_len=8, rule=rule, strength=b)
    for chunk in (3, 8, 64):
        monkeypatch.setattr(ops, "DELTANET_CHUNK", chunk)
        out, M, _ = infini_attention(q, k, v, M0, z0, None, segment_len=8, rule=rule, strength=b)
        assert_close(out, ref, n=64)
        assert_close(M, M_ref, n=64, scale="max")


@pytest.mark.parametrize("chunk", [3, 8, 64])
def test_gated_deltanet_matches_the_token_by_token_recurrence(monkeypatch, chunk):
    """With per-token decays (strong ones, alpha in [0.6, 1], so a wrong weighting would show), the
    sub-chunked triangular solves equal the naive recurrence M <- alpha M, then DeltaNet's write, from
    an empty and a non-empty memory (fp32; n = 64 written tokens)."""
    import memzoo.ops.infini as ops

    monkeypatch.setattr(ops, "DELTANET_CHUNK", chunk)
    rule = MEMORY_RULES["deltanet"]
    q, k, v = qkv(n=8 * 8 + 3)
    g = torch.Generator().manual_seed(4)
    b, decay = torch.rand(2, 2, 67, generator=g), torch.rand(2, 2, 67, generator=g).mul(0.6).add(0.4).log()
    for M0 in (torch.zeros(2, 2, 8, 8), torch.randn(2, 2, 8, 8, generator=g)):
        z0 = torch.zeros(2, 2, 8)
        ref, M_ref, _ = infini_attention_naive(q, k, v, M0, z0, None, segment_len=8, rule=rule, strength=b, decay=decay)
        out, M, _ = infini_attention(q, k, v, M0, z0, None, segment_len=8, rule=rule, strength=b, decay=decay)
        assert_close(out, ref, n=64)
        assert_close(M, M_ref, n=64, scale="max")
        plain = infini_attention(q, k, v, M0, z0, None, segment_len=8, rule=rule, strength=b)[1]
        assert (M - plain).abs().max() > 0.1  # the decay did something


def test_a_decay_needs_the_deltanet_rule():
    with pytest.raises(ValueError, match="deltanet"):
        infini_attention(*qkv(n=16), torch.zeros(2, 2, 8, 8), torch.zeros(2, 2, 8), None, segment_len=8,
                         rule=MemoryRule(), decay=torch.zeros(2, 2, 16))  # fmt: skip


def test_a_fresh_decay_forgets_at_decay_init():
    module = make_module(**VARIANTS["infini-deltanet"], decay=True, decay_init=1e-3)
    module.reset_memory_parameters()
    decay = module._project(torch.randn(1, 5, 32), module.init_state(1))[5]
    assert_close(-decay.expm1(), torch.full_like(decay, 1e-3), dtype=torch.float32, n=4, scale=1e-3)  # 1 - alpha


# ------------------------------------------------------------------------- module vs naive
@pytest.mark.parametrize("knobs", [dict(update_rule=r) for r in RULES] + list(VARIANTS.values()), ids=RULES + list(VARIANTS))
def test_module_matches_naive_over_8_segments(knobs):
    """One call, random cuts and token-by-token all equal the naive reference (fp32, to rounding: one
    layer whose longest reduction is the memory's sum over the 64 written tokens). The conv's left
    context and the buffered write strengths cross the cuts with the state."""
    module = make_module(**knobs)
    x = torch.randn(2, 8 * 8, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        state = module.init_state(2)
        q, k, v, b, _, g = module._project(x, state)
        a, M_ref, z_ref = infini_attention_naive(q, k, v, state.M, state.z, module.beta, segment_len=8, rule=module.rule,
                                                 strength=b, decay=g)  # fmt: skip
        expected = project_out(module, a)
        for cuts in ([], [3, 5, 11, 16, 17, 30, 41, 50, 63], list(range(1, 24))):
            y, state = run(module, x, cuts)
            assert_close(y, expected, n=64)
            assert_close(state.M, M_ref, n=64, scale="max")
            assert state.position == 64 and state.fill == 0


# ------------------------------------------------------------------------- memory maths
def test_linear_rule_is_the_closed_form_sum():
    """After N complete segments (and a tail, not yet written): M = sum s(k_t)^T v_t, z = sum s(k_t)."""
    module = make_module(update_rule="linear")
    x = torch.randn(1, 5 * 8 + 3, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, state = run(module, x, cuts=[7, 20, 21])
        _, k, v = split_heads(module, x[:, : 5 * 8])  # keys un-rotated: no positions on the memory path
    # sums over the 40 written tokens, in another order: M's terms cancel, z's are positive
    assert_close(state.M, einsum(sigma(k), v, "b h n k, b h n v -> b h k v"), n=40, scale="max")
    assert_close(state.z, sigma(k).sum(dim=2), n=40)
    assert state.fill == 3


def test_delta_rule_writing_the_same_pair_twice_leaves_M_unchanged():
    """s(k) M1 / (s(k) z1) = v after the first write, so the second write adds nothing to M."""
    g = torch.Generator().manual_seed(5)
    k, v = torch.randn(1, 2, 1, 8, generator=g), torch.randn(1, 2, 1, 8, generator=g)
    M0, z0 = torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8)
    M1, z1 = memory_write(k, v, M0, z0)
    M2, z2 = memory_write(k, v, M1, z1)
    # bit for bit: from an empty memory the read is exactly 0, so each entry of M1 is 0 + one product
    # and z1 is 0 + s(k); z2 = s(k) + s(k) = 2 z1 (doubling is exact)
    torch.testing.assert_close(M1, einsum(sigma(k[:, :, 0]), v[:, :, 0], "b h k, b h v -> b h k v"), atol=0, rtol=0)
    torch.testing.assert_close(z2, 2 * z1, atol=0, rtol=0)
    # the second write adds s(k)^T (v - read), and the read of v is v only to rounding: a sum over
    # the 8 key dims, added to entries of M1's size (1 ulp of max|M1| already)
    assert_close(M2, M1, n=8, scale="max")
    M2_linear, _ = memory_write(k, v, M1, z1, MemoryRule(update_rule="linear"))
    assert not torch.allclose(M2_linear, M1)  # the linear rule would double it


def test_empty_memory_reads_exactly_zero_without_nan():
    q = torch.randn(1, 2, 5, 8, requires_grad=True)
    M, z = torch.zeros(1, 2, 8, 8, requires_grad=True), torch.zeros(1, 2, 8, requires_grad=True)
    out = memory_read(q, M, z)
    assert torch.equal(out, torch.zeros(1, 2, 5, 8))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, M, z))


def test_first_segment_is_the_gated_local_attention():
    """With an empty memory, A = (1 - sigmoid(beta)) A_dot: the memory contributes nothing."""
    module = make_module()
    x = torch.randn(1, 8, 32)
    with torch.no_grad():
        y, _ = module(x, module.init_state(1))
        q, k, v = split_heads(module, x)
        a = gate_mix(torch.zeros_like(v), local_attention(q, k, v), module.beta)
        # bit for bit: the module runs these very ops on the same 8-token shapes (its memory read is
        # exactly 0, see above), so only a different computation could differ
        torch.testing.assert_close(y, module.out(rearrange(a, "b h n v -> b n (h v)")), atol=0, rtol=0)


def test_deltanet_writing_the_same_pair_twice_leaves_M_unchanged():
    """A unit key written with strength 1 is stored exactly (k k^T = 1), so writing it again adds nothing."""
    g = torch.Generator().manual_seed(5)
    k, v = torch.randn(1, 2, 1, 8, generator=g), torch.randn(1, 2, 1, 8, generator=g)
    rule = MEMORY_RULES["deltanet"]
    M1, z1 = memory_write(k, v, torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8), rule)
    assert_close(memory_read(k, M1, z1, rule), v, n=8)  # a sum over the 8 key dims of a unit key
    M2, _ = memory_write(k, v, M1, z1, rule)
    assert_close(M2, M1, n=8, scale="max")
    # two tokens of one segment with the same key: the second sees the first (token by token), so
    # the pair is still stored once; the paper's delta rule, from the segment's start, writes it twice
    kk, vv = k.repeat(1, 1, 2, 1), v.repeat(1, 1, 2, 1)
    M_net, _ = memory_write(kk, vv, torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8), rule)
    assert_close(M_net, M1, n=8, scale="max")
    M_paper, _ = memory_write(kk, vv, torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8), MEMORY_RULES["delta-l2"])
    assert_close(M_paper, 2 * M1, n=8, scale="max")


def _fact_through_filler(rule: MemoryRule, n_filler_segments: int) -> float:
    """Cosine between the needle's value and the read of its key after repeated filler (one head).

    The filler is one 16-token "sentence" repeated, as the passkey filler is; the needle is one
    unique pair written first. Keys are random on disjoint halves of the 32 dims (0 elsewhere): keys
    a model could learn to keep apart. SiLU(0) = 0 keeps their features orthogonal; ELU(0) + 1 = 1
    makes every ELU + 1 feature overlap every other.
    """
    g = torch.Generator().manual_seed(6)
    needle_k, needle_v = torch.zeros(1, 1, 1, 32), torch.randn(1, 1, 1, 32, generator=g)
    filler_k, filler_v = torch.zeros(1, 1, 16, 32), torch.randn(1, 1, 16, 32, generator=g)
    needle_k[..., 16:] = torch.randn(16, generator=g)
    filler_k[..., :16] = torch.randn(16, 16, generator=g)
    M, z = memory_write(needle_k, needle_v, torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32), rule)
    for _ in range(n_filler_segments):
        M, z = memory_write(filler_k, filler_v, M, z, rule)
    read = memory_read(needle_k, M, z, rule)
    return float(torch.nn.functional.cosine_similarity(read.flatten(), needle_v.flatten(), dim=0))


def test_deltanet_keeps_a_fact_through_repeated_filler_where_the_paper_forgets_it():
    """After 1,000 repetitions of the filler, unit SiLU-L2 keys still return the needle's value; the
    paper's normalised ELU + 1 read returns mostly filler (its keys overlap and z grows with every token)."""
    assert _fact_through_filler(MEMORY_RULES["deltanet"], 1000) > 0.99
    assert _fact_through_filler(MEMORY_RULES["delta"], 1000) < 0.5
    assert _fact_through_filler(MEMORY_RULES["linear"], 1000) < 0.5


def test_deltanet_memory_stays_bounded_over_many_writes():
    """Unit keys and strengths in (0, 1): every token's step is a contraction towards its pair, so
    ||M|| stays at the values' scale; the paper's delta rule with unit keys and no normaliser
    overshoots when a segment repeats a key (each token writes the same correction)."""
    g = torch.Generator().manual_seed(7)
    k, v = torch.randn(1, 1, 200 * 16, 8, generator=g), torch.randn(1, 1, 200 * 16, 8, generator=g)
    k[:, :, ::2] = k[:, :, :1]  # every other token has the same key
    b = torch.rand(1, 1, 200 * 16, generator=g)
    M0, z0 = torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8)
    M, z = M0, z0
    for i in range(200):
        sl = slice(16 * i, 16 * (i + 1))
        M, z = memory_write(k[:, :, sl], v[:, :, sl], M, z, MEMORY_RULES["deltanet"], b[:, :, sl])
    assert torch.isfinite(M).all() and M.norm() < 10 * v.norm(dim=-1).max()
    _, M_paper, _ = infini_attention(
        k, k, v, M0, z0, None, segment_len=16, rule=MEMORY_RULES["delta-l2"], strength=b
    )  # the same writes under the paper's rule
    assert not (torch.isfinite(M_paper).all() and M_paper.norm() < 10 * v.norm(dim=-1).max())


def test_add_mix_starts_as_local_attention_exactly():
    """infini-deltanet as built: the memory's output is 0 and the conv the identity, so a model
    warm-started from a softmax backbone is its local attention, whatever the memory holds."""
    module = InfiniConfig(segment_len=8, **VARIANTS["infini-deltanet"]).build_module(MemZooConfig(d_model=32, n_heads=2), 0)
    x = torch.randn(1, 40, 32, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        y, state = run(module, x, cuts=[13])
        q, k, v = rearrange(module.qkv(x), "b n (three h k) -> three b h n k", three=3, h=2)  # no conv: identity
        a_dot = torch.cat([local_attention(*(t[:, :, s : s + 8] for t in (q, k, v))) for s in range(0, 40, 8)], dim=2)
    assert state.M.abs().sum() > 0  # the memory was written, and is not heard yet
    assert_close(y, module.out(rearrange(a_dot, "b h n v -> b n (h v)")), n=32)


@pytest.mark.parametrize("knobs", [dict(update_rule=r) for r in RULES] + list(VARIANTS.values()), ids=RULES + list(VARIANTS))
def test_gradcheck_float64_through_3_segments(knobs):
    """Gradients w.r.t. the input and the memory's own parameters (gate, memory output, write
    strength, conv, decay), through the memory and the partial-segment buffer."""
    module = make_module(segment_len=3, d_model=8, n_heads=2, dtype=torch.float64, **knobs)
    x = torch.randn(1, 9, 8, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in module.named_parameters() if n.split(".")[0] in ("beta", "mem_out", "strength", "conv", "decay")]
    params = [module.get_parameter(n).detach().clone().requires_grad_() for n in names]

    def outputs(x, *params):  # fed as 4 + 5 tokens, so the partial-segment buffer is on the path too
        state, ys = module.init_state(1, dtype=torch.float64), []
        for piece in (x[:, :4], x[:, 4:]):
            y, state = torch.func.functional_call(module, dict(zip(names, params)), (piece, state))
            ys.append(y)
        return torch.cat(ys, dim=1)

    assert torch.autograd.gradcheck(outputs, (x, *params))


# ------------------------------------------------------------------------- state
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nbytes_formula(dtype):
    """nbytes = b*h*(k*v + k)*4 (fp32 memory) + b*h*s*(k + v)*itemsize(dtype) (partial-segment buffer)."""
    b, h, k, v, s = 3, 2, 16, 16, 8
    module = make_module(segment_len=s, d_model=h * k, n_heads=h)
    state = module.init_state(b, dtype=dtype)
    expected = b * h * (k * v + k) * 4 + b * h * s * (k + v) * torch.tensor([], dtype=dtype).element_size()
    assert state.nbytes() == expected
    with torch.no_grad():
        for n in (5, 8, 13, 1):
            state = module(torch.randn(b, n, h * k), state)[1]  # fp32 activations, a bf16 buffer
            assert state.nbytes() == expected
    assert state.M.dtype == state.z.dtype == torch.float32


def test_nbytes_formula_with_the_additions():
    """write_strength adds b*h*s (the buffered strengths), conv_kernel b*(kernel - 1)*3d (its context), decay b*h*s."""
    b, h, k, s = 3, 2, 16, 8
    module = make_module(segment_len=s, d_model=h * k, n_heads=h, **VARIANTS["infini-deltanet"])
    state = module.init_state(b)
    expected = b * h * (k * k + k) * 4 + b * h * s * 2 * k * 4 + b * h * s * 4 + b * 3 * 3 * h * k * 4
    assert state.nbytes() == expected
    with torch.no_grad():
        for n in (5, 8, 13, 1):
            state = module(torch.randn(b, n, h * k), state)[1]
            assert state.nbytes() == expected
    decaying = make_module(segment_len=s, d_model=h * k, n_heads=h, **VARIANTS["decay"]).init_state(b)
    assert decaying.nbytes() == expected + b * h * s * 4  # the buffered log decays, fp32


def test_bf16_autocast_keeps_memory_maths_in_fp32():
    module = make_module()
    x = torch.randn(1, 21, 32)
    with torch.no_grad():
        ref, _ = run(module, x, cuts=[5])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, state = run(module, x, cuts=[5])
    assert state.M.dtype == state.z.dtype == torch.float32
    assert torch.isfinite(y).all()
    # bf16 rounds each matmul's inputs and output once (accumulation stays fp32), so the error does
    # not grow with the reduction's length: n = 1, one layer; scale: the outputs' size
    assert_close(y.float(), ref, dtype=torch.bfloat16, scale="max")


def test_input_state_is_never_modified():
    module = make_module()
    with torch.no_grad():
        _, state = run(module, torch.randn(1, 13, 32))
        before = [t.clone() for t in (state.M, state.z, state.keys, state.values)]
        module(torch.randn(1, 9, 32), state)
    for old, new in zip(before, (state.M, state.z, state.keys, state.values)):
        assert torch.equal(old, new)
    assert state.position == 13


@pytest.mark.parametrize("every, cuts, reaches", [(0, [], True), (2, [], False), (3, [], True), (2, [6], False), (1, [2], False)])
def test_detach_every_cuts_backprop_through_memory(every, cuts, reaches):
    """Segment 3 sees segment 1 only through the memory: detaching after segment 2 cuts that path."""
    module = make_module(segment_len=4, detach_every=every)
    x = torch.randn(1, 12, 32, requires_grad=True)
    y, _ = run(module, x, cuts)
    y[:, 8:].sum().backward()
    assert bool(x.grad[:, :4].abs().sum() > 0) == reaches
    assert x.grad[:, 8:].abs().sum() > 0


# ------------------------------------------------------------------------- config
def test_config_knobs_reach_the_module():
    import memzoo

    model = memzoo.build("infini-linear", d_model=32, n_layers=2, n_heads=2, gate_init=-2.0, gate_lr_mult=5.0, gate_weight_decay=0.01)
    mixer = model.blocks[1].mixer
    assert isinstance(mixer, InfiniAttention) and mixer.rule.update_rule == "linear"
    assert torch.equal(mixer.beta.data, torch.full((2,), -2.0))  # survives the backbone's generic init
    assert mixer.optim_overrides == {"beta": {"lr_mult": 5.0, "weight_decay": 0.01}}
    assert memzoo.build("infini").blocks[0].mixer.rule == MemoryRule()  # the paper's, unchanged
    net = memzoo.build("infini-deltanet", d_model=32, n_layers=2, n_heads=2).blocks[0].mixer
    assert net.beta is None and net.optim_overrides == {}
    assert torch.equal(net.mem_out.weight, torch.zeros(32, 32)) and torch.equal(net.conv, torch.zeros(96, 4))  # survive the generic init
    assert isinstance(model.init_state(1).layers[0], InfiniState)


@pytest.mark.parametrize(
    "bad, says",
    [
        (dict(segment_len=0), "segment_len"),
        (dict(update_rule="deltas"), "update_rule"),
        (dict(detach_every=-1), "detach_every"),
        (dict(gate_lr_mult=-1.0), "gate_lr_mult"),
        (dict(feature_map="relu"), "feature_map"),
        (dict(feature_map="silu-l2"), "normalize to false"),
        (dict(update_rule="deltanet", normalize=False), "feature_map to 'silu-l2'"),
        (dict(conv_kernel=1), "conv_kernel"),
        (dict(mix="sum"), "mix"),
        (dict(decay=True), "set update_rule to 'deltanet'"),
        (dict(decay_init=0.0), "decay_init"),
    ],
)
def test_bad_config_values(bad, says):
    with pytest.raises(ValueError, match=says):
        InfiniConfig(**bad)


# ------------------------------------------------------------------------- learning (not in CI)
@pytest.mark.slow
def test_infini_learns_recall_through_memory(tmp_path):
    """A few CPU-minutes: the fact sits in segment 1 of 4; memory must beat the knocked-out model."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "recipes" / "memory_learning_check.py"
    spec = importlib.util.spec_from_file_location("memory_learning_check", path)
    recipe = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = recipe  # its dataclasses look their module up there
    spec.loader.exec_module(recipe)
    result = recipe.run(recipe.CheckConfig(), out=tmp_path / "result.json")
    assert result["accuracy_with_memory"] >= 0.8
    assert result["accuracy_memory_knocked_out"] <= 0.2
