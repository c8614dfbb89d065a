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
    gate_mix,
    infini_attention,
    infini_attention_naive,
    local_attention,
    memory_read,
    memory_write,
    sigma,
)

RULES = ["delta", "linear"]


def make_module(segment_len: int = 8, d_model: int = 32, n_heads: int = 2, dtype=torch.float32, **knobs) -> InfiniAttention:
    torch.manual_seed(0)
    module = InfiniConfig(segment_len=segment_len, **knobs).build_module(MemZooConfig(d_model=d_model, n_heads=n_heads), 0)
    with torch.no_grad():
        module.beta.copy_(torch.randn(n_heads))  # a gate away from 0.5, so that a swapped mix would show
    return module.to(dtype)


def split_heads(module: InfiniAttention, x: torch.Tensor):
    """q, k, v [b, h, n, k] exactly as the module makes them."""
    return rearrange(module.qkv(x), "b n (three h k) -> three b h n k", three=3, h=module.n_heads)


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
@pytest.mark.parametrize("rule", RULES)
def test_op_batched_matches_naive(rule):
    """8 complete segments plus a 3-token tail, from an empty and from a non-empty memory (fp32).

    The memory is one running sum over the 64 written tokens (the delta rule subtracts what M already
    returns, which damps earlier rounding rather than compounding it): n = 64, depth 1.
    """
    q, k, v = qkv(n=8 * 8 + 3)
    beta = torch.randn(2, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    empty = (torch.zeros(2, 2, 8, 8), torch.zeros(2, 2, 8))
    full = (torch.randn(2, 2, 8, 8, generator=g), torch.rand(2, 2, 8, generator=g) * 50 + 1)
    for M0, z0 in (empty, full):
        ref, M_ref, z_ref = infini_attention_naive(q, k, v, M0, z0, beta, segment_len=8, delta=rule == "delta")
        out, M, z = infini_attention(q, k, v, M0, z0, beta, segment_len=8, delta=rule == "delta")
        assert_close(out, ref, n=64)
        assert_close(M, M_ref, n=64, scale="max")  # sums of 64 outer products: they cancel
        assert_close(z, z_ref, n=64)  # sums of positive terms: relative


# ------------------------------------------------------------------------- module vs naive
@pytest.mark.parametrize("rule", RULES)
def test_module_matches_naive_over_8_segments(rule):
    """One call, random cuts and token-by-token all equal the naive reference (fp32, to rounding: one
    layer whose longest reduction is the memory's sum over the 64 written tokens)."""
    module = make_module(update_rule=rule)
    x = torch.randn(2, 8 * 8, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        q, k, v = split_heads(module, x)
        state = module.init_state(2)
        a, M_ref, z_ref = infini_attention_naive(q, k, v, state.M, state.z, module.beta, segment_len=8, delta=rule == "delta")
        expected = module.out(rearrange(a, "b h n v -> b n (h v)"))
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
    M1, z1 = memory_write(k, v, M0, z0, delta=True)
    M2, z2 = memory_write(k, v, M1, z1, delta=True)
    # bit for bit: from an empty memory the read is exactly 0, so each entry of M1 is 0 + one product
    # and z1 is 0 + s(k); z2 = s(k) + s(k) = 2 z1 (doubling is exact)
    torch.testing.assert_close(M1, einsum(sigma(k[:, :, 0]), v[:, :, 0], "b h k, b h v -> b h k v"), atol=0, rtol=0)
    torch.testing.assert_close(z2, 2 * z1, atol=0, rtol=0)
    # the second write adds s(k)^T (v - read), and the read of v is v only to rounding: a sum over
    # the 8 key dims, added to entries of M1's size (1 ulp of max|M1| already)
    assert_close(M2, M1, n=8, scale="max")
    M2_linear, _ = memory_write(k, v, M1, z1, delta=False)
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


@pytest.mark.parametrize("rule", RULES)
def test_gradcheck_float64_through_3_segments(rule):
    """Gradients w.r.t. the input and the gates, through the memory and the partial-segment buffer."""
    module = make_module(segment_len=3, d_model=8, n_heads=2, dtype=torch.float64, update_rule=rule)
    x = torch.randn(1, 9, 8, dtype=torch.float64, requires_grad=True)
    beta = module.beta.detach().clone().requires_grad_()

    def outputs(x, beta):  # fed as 4 + 5 tokens, so the partial-segment buffer is on the path too
        state, ys = module.init_state(1, dtype=torch.float64), []
        for piece in (x[:, :4], x[:, 4:]):
            y, state = torch.func.functional_call(module, {"beta": beta}, (piece, state))
            ys.append(y)
        return torch.cat(ys, dim=1)

    assert torch.autograd.gradcheck(outputs, (x, beta))


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
    assert isinstance(mixer, InfiniAttention) and not mixer.delta
    assert torch.equal(mixer.beta.data, torch.full((2,), -2.0))  # survives the backbone's generic init
    assert mixer.optim_overrides == {"beta": {"lr_mult": 5.0, "weight_decay": 0.01}}
    assert memzoo.build("infini").blocks[0].mixer.delta
    assert isinstance(model.init_state(1).layers[0], InfiniState)


@pytest.mark.parametrize("bad", [dict(segment_len=0), dict(update_rule="deltas"), dict(detach_every=-1), dict(gate_lr_mult=-1.0)])
def test_bad_config_values(bad):
    with pytest.raises(ValueError):
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
