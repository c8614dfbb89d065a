"""Titans: the chunked memory against the token-by-token reference, and each placement against a
small hand-written reference of its data flow (the conformance suite checks the interface rules).
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from tolerance import assert_close

from memzoo.memories.titans import (
    NeuralMemory,
    TitansConfig,
    TitansLMM,
    TitansMAC,
    TitansMACConfig,
    TitansMAG,
    TitansMAGConfig,
    TitansMAL,
    TitansMALConfig,
)
from memzoo.ops.rope import apply_rope
from memzoo.ops.titans import memory_read, mlp_shapes, titans_chunked, titans_naive
from memzoo.training.param_groups import param_groups


# ------------------------------------------------------------------------------ ops
def memory_inputs(b=2, h=3, n=40, k=8, depth=2, *, dtype=torch.float32, lr=0.02, seed=0):
    """Random memory, l2-normalised q/k, and gates in the range a trained model uses."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=dtype)

    shapes = mlp_shapes(depth, k)
    weights = tuple(randn(b, h, o, i) / math.sqrt(i) for o, i in shapes)
    momentum = tuple(0.01 * randn(b, h, o, i) for o, i in shapes)
    q, kk = (F.normalize(randn(b, h, n, k), dim=-1) for _ in range(2))
    v = randn(b, h, n, k)
    eta, theta, alpha = 0.5 + 0.5 * rand(b, h, n), lr * rand(b, h, n), 0.05 * rand(b, h, n)
    return weights, momentum, q, kk, v, eta, theta, alpha


def assert_memory_close(a, b, **op):
    """Reads, then weights and momentum: each to the rounding of ``op`` (n, depth) at its own max
    (memory matrices and momenta cancel to ~0)."""
    assert_close(a[0], b[0], scale="max", **op)
    for x, y in zip(a[1] + a[2], b[1] + b[2]):
        assert_close(x, y, scale="max", **op)


def widest(depth: int, k: int) -> int:
    """The memory MLP's longest reduction: its widest layer."""
    return max(max(shape) for shape in mlp_shapes(depth, k))


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("chunk", [1, 16])
def test_chunked_matches_naive(depth, chunk):
    """fp32, to rounding: reads, and memory + momentum after the last complete chunk (40 = 2 x 16 + 8).

    With these weak gates (lr <= 0.02, forgetting) the memory is a decayed sum of the 40 tokens'
    updates, and rounding adds up like a sum's: n = 40 (more than the widest layer, 32); each
    update and read goes through the memory's ``depth`` layers.
    """
    args = memory_inputs(depth=depth)
    rn = depth >= 2
    naive = titans_naive(*args, chunk_size=chunk, residual_norm=rn)
    fast = titans_chunked(*args, chunk_size=chunk, residual_norm=rn)
    assert_memory_close(fast, naive, n=max(40, widest(depth, 8)), depth=depth)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_chunked_matches_naive_fp64_strong_gates(depth):
    """Large inner steps make fp32 chaotic; in fp64 the two forms agree to rounding.

    Chaotic still: lr 0.1 makes each inner step expansive, so rounding compounds over the steps in
    series instead of adding. depth = steps x 2L (each step goes forward and back through the L
    layers) x L (the expansion grows with the memory's depth; at L = 3, chunk 1 the reads differ
    by 2e-12 with AVX-512 and 5e-12 without SIMD, of values up to 2.7).
    """
    args = memory_inputs(n=29, depth=depth, dtype=torch.float64, lr=0.1)
    for chunk in (1, 4):
        naive = titans_naive(*args, chunk_size=chunk, residual_norm=depth >= 2)
        fast = titans_chunked(*args, chunk_size=chunk, residual_norm=depth >= 2)
        steps = -(-29 // chunk)
        assert_memory_close(fast, naive, n=widest(depth, 8), depth=steps * 2 * depth * depth)


def test_outer_gradients_match_naive():
    """Back-propagation through the inner updates (closed form) equals autograd through torch.func."""
    args = memory_inputs(b=1, h=2, n=11, k=4, dtype=torch.float64, lr=0.1)
    leaves = []

    def leaf(t):
        if isinstance(t, tuple):
            return tuple(leaf(x) for x in t)
        t = t.clone().requires_grad_()
        leaves.append(t)
        return t

    args = [leaf(a) for a in args]
    grads = []
    for fn in (titans_naive, titans_chunked):
        reads, w, s = fn(*args, chunk_size=4)
        loss = reads.pow(2).sum() + sum(x.pow(2).sum() for x in w + s)
        grads.append(torch.autograd.grad(loss, leaves))
    for fast, naive in zip(*grads):
        assert fast.abs().sum() > 0
        # fp64; the widest layer (16) is the longest reduction; the 3 chunks forward, then back
        # through them (depth 6); gradients cancel: each tensor's own max is the scale
        assert_close(fast, naive, n=widest(2, 4), depth=2 * 3, scale="max")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_norm_gain_matches_naive_and_reaches_the_values_scale(dtype):
    """The gain enters the reads and the inner gradients alike in both forms; and it is what lets the
    memory's output reach values of another scale: without it ||M(x) - x|| = sqrt(k) whatever the weights."""
    weights, momentum, q, k, v, eta, theta, alpha = memory_inputs(dtype=dtype)
    gain = 0.1 + 0.4 * torch.rand(3, 8, generator=torch.Generator().manual_seed(1), dtype=dtype)
    naive = titans_naive(weights, momentum, q, k, v, eta, theta, alpha, chunk_size=16, gain=gain)
    fast = titans_chunked(weights, momentum, q, k, v, eta, theta, alpha, chunk_size=16, gain=gain)
    assert_memory_close(fast, naive, n=max(40, widest(2, 8)), depth=2)
    plain = titans_chunked(weights, momentum, q, k, v, eta, theta, alpha, chunk_size=16)
    offset = (plain[0] - q).norm(dim=-1)
    # the LayerNorm's output has mean 0 and variance var / (var + LN_EPS) over k = 8 channels: not a rounding
    # tolerance but the epsilon's, 1e-5 against variances of z down to ~1e-2 here (a shift of up to 1e-3)
    torch.testing.assert_close(offset, torch.full_like(offset, math.sqrt(8)), rtol=1e-2, atol=0)
    gained = (fast[0] - q).norm(dim=-1)
    assert float(gained.max()) < 0.5 * math.sqrt(8)  # g <= 0.5 shrinks it: the scale is learnable


def test_chaining_three_segments_equals_one_call():
    """Cut at chunk boundaries, the committed memory carries the stream exactly."""
    weights, momentum, q, k, v, eta, theta, alpha = memory_inputs(n=48)
    whole = titans_chunked(weights, momentum, q, k, v, eta, theta, alpha, chunk_size=8)
    reads = []
    for lo, hi in [(0, 16), (16, 24), (24, 48)]:
        r, weights, momentum = titans_chunked(weights, momentum, *(t[:, :, lo:hi] for t in (q, k, v, eta, theta, alpha)), chunk_size=8)
        reads.append(r)
    # bit for bit: titans_chunked runs chunk by chunk, and the cuts fall on chunk boundaries, so each
    # chunk sees the same ops on the same values whether or not it shares a call with the others
    torch.testing.assert_close(torch.cat(reads, dim=2), whole[0], atol=0, rtol=0)
    for got, want in zip(weights + momentum, whole[1] + whole[2]):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_partial_chunk_is_read_but_not_committed():
    args = memory_inputs(n=10)
    reads, weights, momentum = titans_chunked(*args, chunk_size=16)
    assert reads.shape[2] == 10
    assert all(a is b for a, b in zip(weights + momentum, args[0] + args[1]))


def test_stop_grad_cuts_the_inner_updates():
    weights, momentum, q, k, v, eta, theta, alpha = memory_inputs(n=12)
    k, q = k.clone().requires_grad_(), q.clone().requires_grad_()
    reads, w, _ = titans_chunked(weights, momentum, q, k, v, eta, theta, alpha, chunk_size=4, stop_grad=True)
    assert not any(t.requires_grad for t in w)
    gq, gk = torch.autograd.grad(reads.sum(), (q, k), allow_unused=True)
    assert gq is not None and gq.abs().sum() > 0 and gk is None


def _token_grad_norms(weights, k, v):
    """Each token's inner-gradient norm (all layers together) at ``weights``, by autograd: [b, h, n]."""
    b, h, n = k.shape[:3]
    out = torch.zeros(b, h, n, dtype=k.dtype)
    for t in range(n):
        ws = tuple(w.clone().requires_grad_() for w in weights)
        loss = (memory_read(ws, k[:, :, t : t + 1], residual_norm=True) - v[:, :, t : t + 1]).pow(2).sum()
        grads = torch.autograd.grad(loss, ws)  # rows and heads are independent: each [b, h] slot is its own gradient
        out[:, :, t] = sum(g.pow(2).sum((-2, -1)) for g in grads).sqrt()
    return out


def test_inner_grad_clip_bounds_each_write():
    """max_grad_norm: a token's write is theta times its gradient clipped to that norm (all layers together).

    One token, no momentum carried in (S_0 = 0), no forgetting: W_1 - W_0 = -theta clip(grad). Large values
    (|v| ~ 10) give gradients well above the bound; below the bound the clip is the identity, bit for bit.
    """
    weights, momentum, q, k, v, eta, theta, alpha = memory_inputs(n=1, dtype=torch.float64)
    momentum = tuple(torch.zeros_like(m) for m in momentum)
    v, theta, alpha = 10 * v, torch.ones_like(theta), torch.zeros_like(alpha)
    raw = _token_grad_norms(weights, k, v)[..., 0]  # [b, h]
    assert float(raw.min()) > 4  # the clip below is active in every (row, head)
    for fn in (titans_chunked, titans_naive):
        _, w1, _ = fn(weights, momentum, q, k, v, eta, theta, alpha, chunk_size=1, max_grad_norm=2.0)
        step = sum((a - b).pow(2).sum((-2, -1)) for a, b in zip(w1, weights)).sqrt()
        torch.testing.assert_close(step, torch.full_like(step, 2.0), rtol=1e-10, atol=0)
        _, w_off, _ = fn(weights, momentum, q, k, v, eta, theta, alpha, chunk_size=1)
        torch.testing.assert_close(sum((a - b).pow(2).sum((-2, -1)) for a, b in zip(w_off, weights)).sqrt(), raw)
    args = memory_inputs()  # weak gates and unit values: every gradient is below 1e3
    reads, memory, _ = titans_chunked(*args, chunk_size=16, max_grad_norm=1e3)
    reads_off, memory_off, _ = titans_chunked(*args, chunk_size=16)
    for got, want in zip((reads, *memory), (reads_off, *memory_off)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("chunk", [1, 4])
def test_inner_grad_clip_matches_naive(chunk):
    """Clipped, the chunked form still equals the reference (fp64), reads, memory and outer gradients alike."""
    weights, momentum, q, k, v, eta, theta, alpha = memory_inputs(b=1, h=2, n=13, k=4, dtype=torch.float64, lr=0.5)
    v = 5 * v  # most tokens' gradients are above the bound
    leaves = [t.clone().requires_grad_() for t in (*weights, q, k, v, theta)]
    ws, (q, k, v, theta) = tuple(leaves[: len(weights)]), leaves[len(weights) :]
    results, grads = [], []
    for fn in (titans_naive, titans_chunked):
        out = fn(ws, momentum, q, k, v, eta, theta, alpha, chunk_size=chunk, max_grad_norm=1.0)
        results.append(out)
        loss = out[0].pow(2).sum() + sum(x.pow(2).sum() for x in out[1])
        grads.append(torch.autograd.grad(loss, leaves))
    unclipped = titans_chunked(ws, momentum, q, k, v, eta, theta, alpha, chunk_size=chunk)
    assert float((unclipped[0] - results[1][0]).abs().max()) > 1e-2  # the clip is active: it changed the reads
    steps = -(-13 // chunk)
    assert_memory_close(results[1], results[0], n=widest(2, 4), depth=steps * 2 * 2 * 2)
    for fast, naive in zip(*grads):
        assert fast.abs().sum() > 0
        assert_close(fast, naive, n=widest(2, 4), depth=2 * steps * 2 * 2, scale="max")


@pytest.mark.parametrize("chunk", [1, 4])
def test_first_order_matches_naive_and_only_cuts_the_inner_gradients_path(chunk):
    """first_order: the same forward values bit for bit; outer gradients equal the reference's first-order
    ones (fp64), and differ from the exact ones only where d grad / dW enters (the weights); the gates' and
    values' gradients still flow."""
    weights, momentum, q, k, v, eta, theta, alpha = memory_inputs(b=1, h=2, n=13, k=4, dtype=torch.float64, lr=0.5)
    leaves = [t.clone().requires_grad_() for t in (*weights, q, k, v, theta)]
    ws, (q, k, v, theta) = tuple(leaves[: len(weights)]), leaves[len(weights) :]
    steps = -(-13 // chunk)
    outs, grads = {}, {}
    for fn in (titans_naive, titans_chunked):
        for first_order in (False, True):
            out = fn(ws, momentum, q, k, v, eta, theta, alpha, chunk_size=chunk, first_order=first_order)
            outs[fn, first_order] = out
            loss = out[0].pow(2).sum() + sum(x.pow(2).sum() for x in out[1])
            grads[fn, first_order] = torch.autograd.grad(loss, leaves)
    for fn in (titans_naive, titans_chunked):  # forward unchanged
        for got, want in zip((outs[fn, True][0], *outs[fn, True][1]), (outs[fn, False][0], *outs[fn, False][1])):
            torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert_memory_close(outs[titans_chunked, True], outs[titans_naive, True], n=widest(2, 4), depth=steps * 2 * 2)
    for fast, naive in zip(grads[titans_chunked, True], grads[titans_naive, True]):
        assert fast.abs().sum() > 0  # every leaf still gets a gradient
        assert_close(fast, naive, n=widest(2, 4), depth=2 * steps * 2 * 2, scale="max")
    exact, first = grads[titans_chunked, False], grads[titans_chunked, True]
    for i in range(len(weights)):  # the weights' gradient loses the d grad / dW path: it changes
        assert float((exact[i] - first[i]).abs().max()) > 1e-3 * float(exact[i].abs().max())


def test_a_forget_gate_of_exactly_one_keeps_gradients_finite():
    """alpha == 1.0 (a sigmoid saturated in fp32: a trained titans-mag's forget gate fully erased one head's
    memory on a needle digit) gives finite outer gradients, equal to the reference's, where 1 - alpha is 0.

    The chunked form floors log(1 - alpha) at -30 (exp(-30) ~ 1e-13 of the memory is left, within fp32
    rounding of the reference's 0). Before, the floor's zero gradient met log1p's 1 / (1 - alpha) = inf:
    0 * inf = NaN in every gradient upstream, and the run stopped on a NaN gradient norm.
    """
    weights, momentum, q, k, v, eta, theta, alpha = memory_inputs(b=1, h=2, n=11, k=4, lr=0.1)
    alpha = alpha.clone()
    alpha[0, 0, 2] = alpha[0, 1, 5] = alpha[0, 1, 6] = 1.0  # mid-chunk, and twice in a row
    leaves = [t.clone().requires_grad_() for t in (*weights, q, k, v, eta, theta, alpha)]
    ws, (q, k, v, eta, theta, alpha) = tuple(leaves[: len(weights)]), leaves[len(weights) :]
    results, grads = [], []
    for fn in (titans_naive, titans_chunked):
        out = fn(ws, momentum, q, k, v, eta, theta, alpha, chunk_size=4)
        results.append(out)
        loss = out[0].pow(2).sum() + sum(x.pow(2).sum() for x in out[1] + out[2])
        grads.append(torch.autograd.grad(loss, leaves))
    assert_memory_close(results[1], results[0], n=widest(2, 4), depth=3 * 2 * 2)
    erased = alpha.detach() == 1
    for i, (naive, fast) in enumerate(zip(*grads)):  # in the order of the loop above
        assert torch.isfinite(fast).all()
        if i == len(leaves) - 1:
            # alpha's own gradient where alpha == 1: 0 in the chunked form (the floored log is flat there;
            # in a model the saturated sigmoid's derivative is 0 anyway), -<dL/dW, W> in the reference
            assert float(fast[erased].abs().max()) == 0.0
            fast, naive = fast.masked_fill(erased, 0), naive.masked_fill(erased, 0)
        assert_close(fast, naive, n=widest(2, 4), depth=2 * 3 * 2 * 2, scale="max")


# ------------------------------------------------------------------------------ placements: references
D, H, N = 16, 2, 21
SMALL = dict(chunk_size=4, lr_init=0.05, max_lr=0.1, momentum_init=0.8, forget_init=0.01)


def perturbed(mod):
    """The module with its output gates and norm gain moved off their initial values (a gate starting
    at exactly 1 would hide a wrong gate from the references)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        if mod.memory.norm_gain is not None:
            mod.memory.norm_gain.copy_(0.2 + 0.6 * torch.rand(mod.memory.norm_gain.shape, generator=g))
        for name in ("read_norm", "out_norm", "out_gate", "memory_norm", "memory_out"):
            if getattr(mod, name, None) is not None:
                mod.get_submodule(name).weight.copy_(torch.randn(mod.get_submodule(name).weight.shape, generator=g))
        conv = getattr(getattr(mod, "attn", None), "conv", None)
        if conv is not None:  # the attention's short conv off the identity
            conv.copy_(0.5 * torch.randn(conv.shape, generator=g))
        # the memory's conv starts at the identity too: mix the tokens, so the references check the taps' order
        mod.memory.conv.copy_(torch.rand(mod.memory.conv.shape, generator=g) - 0.5)
    return mod


def heads(t):
    return rearrange(t, "b n (h k) -> b h n k", h=H)


def merge(t):
    return rearrange(t, "b h n k -> b n (h k)")


def ref_memory(mem: NeuralMemory, x: torch.Tensor, *, committed: bool = False):
    """Reads [b, n, d] of a memory fed the whole stream x from its start, token by token (and, if
    ``committed``, its weights after the last complete chunk)."""
    proj = x @ mem.qkv.weight.T  # [b, n, 3d]
    K = mem.conv.shape[1]
    padded = F.pad(proj, (0, 0, K - 1, 0))  # a stream starts with zero context
    conv = sum(padded[:, j : j + x.shape[1]] * mem.conv[:, j] for j in range(K))
    q, k, v = (heads(t) for t in F.silu(conv).chunk(3, dim=-1))
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    eta = mem.config.max_momentum * torch.sigmoid(mem.eta(x))
    theta = mem.config.max_lr * torch.sigmoid(mem.theta(x))
    alpha = torch.sigmoid(mem.alpha(x))
    gates = (rearrange(g, "b n h -> b h n") for g in (eta, theta, alpha))
    w0 = tuple(w.expand(x.shape[0], *w.shape) for w in mem.init_weights)
    reads, weights, _ = titans_naive(
        w0, tuple(torch.zeros_like(w) for w in w0), q, k, v, *gates, chunk_size=mem.config.chunk_size, residual_norm=mem.residual_norm,
        gain=mem.norm_gain,
    )  # fmt: skip
    return (merge(reads), weights) if committed else merge(reads)


def softmax_attend(q, k, v):  # q [b, h, 1, k]
    return ((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])).softmax(-1) @ v


def ref_window(attn, x: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """Sliding window over [prefix | x], token by token. Positions: the query at stream p sits at
    N_p + W + (p mod W) (block-local), a key at stream j at the same position minus p - j, the
    prefix at 0..N_p-1."""
    W, n_p, theta = attn.window, prefix.shape[1], attn.rope_theta
    p = torch.cat([attn.proj.q(x), attn.proj.kv(x)], dim=-1)
    if attn.conv is not None:  # y_t = sum_j taps[:, j] p_{t - K + 1 + j}, zeros before the stream; the last tap is 1 + offset
        K = attn.conv.shape[1]
        taps = attn.conv + F.one_hot(torch.tensor(K - 1), K).to(attn.conv.dtype)
        p = sum(taps[:, j] * F.pad(p, (0, 0, K - 1 - j, 0))[:, : x.shape[1]] for j in range(K))
    q, k, v = (heads(t) for t in p.chunk(3, dim=-1))
    kp, vp = (heads(t).expand(x.shape[0], -1, -1, -1) for t in attn.proj.kv(prefix).chunk(2, dim=-1))
    outs = []
    for p in range(x.shape[1]):
        lo = max(0, p - W + 1)
        qpos = n_p + W + p % W
        keys = torch.cat(
            [apply_rope(kp, torch.arange(n_p), theta), apply_rope(k[:, :, lo : p + 1], qpos - p + torch.arange(lo, p + 1), theta)], 2
        )
        vals = torch.cat([vp, v[:, :, lo : p + 1]], dim=2)
        outs.append(softmax_attend(apply_rope(q[:, :, p : p + 1], torch.tensor([qpos]), theta), keys, vals))
    return merge(torch.cat(outs, dim=2))


def ref_mac(mod: TitansMAC, x: torch.Tensor) -> torch.Tensor:
    """Eqs. 21-25, segment by segment; the memory is re-run from M_0 over all y so far."""
    mem, S, n_p, theta = mod.memory, mod.segment_len, mod.config.n_persistent, mod.rope_theta
    d, b = x.shape[2], x.shape[0]
    K = mem.conv.shape[1]
    padded = F.pad(x @ mem.qkv.weight[:d].T, (0, 0, K - 1, 0))
    qh = F.normalize(heads(F.silu(sum(padded[:, j : j + x.shape[1]] * mem.conv[:d, j] for j in range(K)))), dim=-1)
    q = heads(mod.attn.q(x))
    kx, vx = (heads(t) for t in mod.attn.kv(x).chunk(2, dim=-1))
    kp, vp = (heads(t).expand(b, -1, -1, -1) for t in mod.attn.kv(mod.persistent[None]).chunk(2, dim=-1))
    weights = tuple(w.expand(b, *w.shape) for w in mem.init_weights)
    ys, outs = [], []  # what the memory is written with: y, or x + y (write_input "residual")
    for s0 in range(0, x.shape[1], S):
        s1 = min(x.shape[1], s0 + S)
        if ys:  # the memory at this segment's start: after all earlier writes (a chunk boundary)
            weights = ref_memory(mem, mod.write_norm(torch.cat(ys, dim=1)), committed=True)[1]
        gain = mem.norm_gain[None, :, None, :]
        h = merge(memory_read(weights, qh[:, :, s0:s1], residual_norm=mem.residual_norm, gain=gain))  # eq. 21
        kh, vh = (heads(t) for t in mod.attn.kv(h).chunk(2, dim=-1))
        att = []
        for i in range(s1 - s0):  # eqs. 22-23: [persistent | h_0..h_i | x_0..x_i]
            keys = torch.cat(
                [
                    apply_rope(kp, torch.arange(n_p), theta),
                    apply_rope(kh[:, :, : i + 1], n_p + torch.arange(i + 1), theta),
                    apply_rope(kx[:, :, s0 : s0 + i + 1], n_p + S + torch.arange(i + 1), theta),
                ],
                dim=2,
            )
            vals = torch.cat([vp, vh[:, :, : i + 1], vx[:, :, s0 : s0 + i + 1]], dim=2)
            att.append(softmax_attend(apply_rope(q[:, :, s0 + i : s0 + i + 1], torch.tensor([n_p + S + i]), theta), keys, vals))
        y = mod.attn_out(merge(torch.cat(att, dim=2)))
        ys.append(x[:, s0:s1] + y if mod.config.write_input == "residual" else y)
        reads = ref_memory(mem, mod.write_norm(torch.cat(ys, dim=1)))  # eq. 24: written with norm(.), read after each write
        if mod.config.output == "add":  # not the paper's: the read added through its own projection
            outs.append(mod.out(y) + mod.memory_out(mod.read_norm(reads[:, s0:s1])))
        else:
            outs.append(mod.out(y * 2 * torch.sigmoid(mod.read_norm(reads[:, s0:s1]))))  # eq. 25, the gate
    return torch.cat(outs, dim=1)


def placement_op(mod) -> dict:
    """Rounding of a placement against its reference, for the tolerance helper: the longest reduction
    is the memory's sum over the N tokens or its widest layer; in series, the input projection, the
    memory's L layers and the output projection."""
    L = mod.memory.config.memory_depth
    return dict(n=max(N, widest(L, D // H)), depth=L + 2)


def run_module(mod, x, cuts=()):
    state, outs, start = mod.init_state(x.shape[0]), [], 0
    for end in [*cuts, x.shape[1]]:
        out, state = mod(x[:, start:end], state)
        outs.append(out)
        start = end
    return torch.cat(outs, dim=1), state


@pytest.fixture
def x():
    return torch.randn(2, N, D, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("max_momentum", [1.0, 0.9])
def test_lmm_matches_reference(x, max_momentum):
    torch.manual_seed(0)
    mod = perturbed(TitansLMM(D, H, TitansConfig(**SMALL, max_momentum=max_momentum)))
    with torch.no_grad():
        want = mod.out(mod.out_norm(ref_memory(mod.memory, x)) * torch.sigmoid(mod.out_gate(x)))
        assert_close(run_module(mod, x, [5, 6, 13])[0], want, **placement_op(mod))


@pytest.mark.parametrize("write_input, output", [("residual", "gate"), ("attention", "gate"), ("residual", "add")])
def test_mac_matches_reference(x, write_input, output):
    torch.manual_seed(0)
    config = TitansMACConfig(segment_len=8, n_persistent=2, write_input=write_input, output=output, **SMALL)
    mod = perturbed(TitansMAC(D, H, config))
    with torch.no_grad():
        assert_close(run_module(mod, x, [3, 11, 12])[0], ref_mac(mod, x), **placement_op(mod))


@pytest.mark.parametrize("output, attn_conv", [("gate", 0), ("normed", 0), ("normed", 3), ("add", 3)])
def test_mag_matches_reference(x, output, attn_conv):
    torch.manual_seed(0)
    mod = perturbed(TitansMAG(D, H, TitansMAGConfig(window=6, n_persistent=2, output=output, attn_conv_kernel=attn_conv, **SMALL)))
    with torch.no_grad():
        y = ref_window(mod.attn, x, mod.persistent[None])
        gate = torch.sigmoid(mod.memory_norm(ref_memory(mod.memory, x)))  # eq. 28
        if output == "add":  # not the paper's: the read added through its own projection
            want = mod.out(y) + mod.memory_out(mod.memory_norm(ref_memory(mod.memory, x)))
        else:
            want = mod.out(y * 2 * gate if output == "gate" else mod.attn_norm(y) * gate)
        assert_close(run_module(mod, x, [4, 9])[0], want, **placement_op(mod))


def test_mag_gate_at_exactly_one_is_a_saddle_and_gate_init_leaves_it(x):
    """With the gate's norm weight at 0, MAG's memory read gets no gradient (nor the memory's keys and values
    behind it): the memory cannot start learning. A small gate_init gives it one. (MAC's memory also feeds
    the attention context through h, so its gate at 1 is no saddle.)"""
    grads = {}
    for gate_init in (0.0, 0.3):
        torch.manual_seed(0)
        mod = TitansMAG(D, H, TitansMAGConfig(window=6, n_persistent=2, output="gate", gate_init=gate_init, **SMALL))
        run_module(mod, x)[0].pow(2).sum().backward()
        grads[gate_init] = float(mod.memory.qkv.weight.grad.abs().max())
    assert grads[0.0] == 0.0 and grads[0.3] > 0.0


def test_mag_gate_starts_at_one(x):
    """A fresh MAG is its window attention alone: the memory's gate is exactly 1."""
    torch.manual_seed(0)
    mod = TitansMAG(D, H, TitansMAGConfig(window=6, n_persistent=2, output="gate", gate_init=0.0, **SMALL))
    assert float(mod.memory_norm.weight.abs().max()) == 0.0
    with torch.no_grad():
        y = ref_window(mod.attn, x, mod.persistent[None])
        assert_close(run_module(mod, x, [4, 9])[0], mod.out(y), **placement_op(mod))


def test_mag_add_starts_as_its_window_attention_and_the_memory_then_learns(x):
    """output="add": W_M starts at 0, so a fresh MAG is its window attention exactly; W_M gets a gradient at
    once, and after one SGD step on it the memory's own projections get one too."""
    torch.manual_seed(0)
    mod = TitansMAG(D, H, TitansMAGConfig(window=6, n_persistent=2, output="add", **SMALL))
    assert float(mod.memory_out.weight.abs().max()) == 0.0
    with torch.no_grad():
        y = ref_window(mod.attn, x, mod.persistent[None])
        assert_close(run_module(mod, x, [4, 9])[0], mod.out(y), **placement_op(mod))
    run_module(mod, x)[0].pow(2).sum().backward()
    assert float(mod.memory_out.weight.grad.abs().max()) > 0 and mod.memory.qkv.weight.grad.abs().max() == 0
    with torch.no_grad():
        mod.memory_out.weight -= 0.1 * mod.memory_out.weight.grad
    mod.zero_grad()
    run_module(mod, x)[0].pow(2).sum().backward()
    assert float(mod.memory.qkv.weight.grad.abs().max()) > 0


@pytest.mark.parametrize("attn_conv", [0, 3])
def test_mal_matches_reference(x, attn_conv):
    torch.manual_seed(0)
    mod = perturbed(TitansMAL(D, H, TitansMALConfig(window=6, n_persistent=2, attn_conv_kernel=attn_conv, **SMALL)))
    with torch.no_grad():
        r = ref_memory(mod.memory, torch.cat([mod.persistent[None].expand(2, -1, -1), x], dim=1))  # eq. 30
        want = mod.out(ref_window(mod.attn, r[:, 2:], r[:, :2]))  # eq. 31, the persistent reads as prefix
        assert_close(run_module(mod, x, [1, 2, 10])[0], want, **placement_op(mod))


# ------------------------------------------------------------------------------ placements: properties
@pytest.mark.parametrize("stop", [False, True])
def test_gradients_reach_gates_and_keys_through_the_inner_loop(x, stop):
    """W_K, W_V and the gates act on the output only through the memory's writes."""
    torch.manual_seed(0)
    mod = TitansLMM(D, H, TitansConfig(**SMALL, stop_inner_grad=stop))
    out, _ = run_module(mod, x)
    out[:, 8:].pow(2).sum().backward()
    mem = mod.memory
    through_writes = {
        "W_K": mem.qkv.weight.grad[D : 2 * D],
        "W_V": mem.qkv.weight.grad[2 * D :],
        **{name: getattr(mem, name).weight.grad for name in ("eta", "theta", "alpha")},
    }
    for name, grad in through_writes.items():
        reached = grad is not None and grad.abs().sum() > 0
        assert reached != stop, f"{name}: gradient {'reached' if reached else 'missing'} with stop_inner_grad={stop}"
    assert mem.qkv.weight.grad[:D].abs().sum() > 0  # W_Q reads: always trained
    if not stop:
        assert all(w.grad.abs().sum() > 0 for w in mem.init_weights)


PLACEMENTS = [(TitansLMM, TitansConfig), (TitansMAC, TitansMACConfig), (TitansMAG, TitansMAGConfig), (TitansMAL, TitansMALConfig)]
KNOBS = {
    TitansConfig: {},
    TitansMACConfig: {"segment_len": 8, "n_persistent": 2},
    TitansMAGConfig: {"window": 6, "n_persistent": 2, "attn_conv_kernel": 3},
    TitansMALConfig: {"window": 6, "n_persistent": 2, "attn_conv_kernel": 3},
}


@pytest.mark.parametrize("cls, config", PLACEMENTS)
def test_nbytes_flat_over_200_segments(cls, config):
    mod = cls(D, H, config(**SMALL, **KNOBS[config]))
    state = mod.init_state(1)
    sizes = set()
    with torch.no_grad():
        for i in range(200):
            _, state = mod(torch.randn(1, 1 + i % 7, D), state)
            sizes.add(state.nbytes())
    assert len(sizes) == 1


@pytest.mark.parametrize("cls, config", PLACEMENTS)
def test_split_invariance_is_exact_in_fp64(cls, config):
    """fp32 cuts differ only by rounding that the memory's dynamics amplify: in fp64 they agree.

    Amplified, so the memory's chunks count in series: depth = ceil(150 / chunk_size) chunks; n is
    the memory's widest layer.
    """
    torch.manual_seed(0)
    mod = cls(D, H, config(**SMALL, **KNOBS[config])).double()
    x = torch.randn(2, 150, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = mod(x, mod.init_state(2, dtype=torch.float64))[0]
        state, outs = mod.init_state(2, dtype=torch.float64), []
        for lo, hi in [(0, 7), (7, 8), (8, 61), (61, 99), (99, 150)]:
            out, state = mod(x[:, lo:hi], state)
            outs.append(out)
    cfg = mod.memory.config
    assert_close(torch.cat(outs, dim=1), whole, n=widest(cfg.memory_depth, D // H), depth=-(-150 // cfg.chunk_size))


def test_memory_maths_stays_fp32_under_autocast(x):
    mod = TitansMAC(D, H, TitansMACConfig(segment_len=8, n_persistent=2, **SMALL))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, state = run_module(mod, x)
    assert torch.isfinite(out).all()
    assert all(w.dtype == torch.float32 for w in state.memory.weights + state.segment_weights)


def test_a_fresh_attention_conv_is_the_identity(x):
    """attn_conv_kernel starts at the identity: a MAG with it computes what the MAG without it computes."""
    outs = []
    for kernel in (0, 4):
        torch.manual_seed(0)
        mod = perturbed(TitansMAG(D, H, TitansMAGConfig(window=6, n_persistent=2, **SMALL)))
        conv = TitansMAG(D, H, TitansMAGConfig(window=6, n_persistent=2, attn_conv_kernel=kernel, **SMALL))
        missing, unexpected = conv.load_state_dict(mod.state_dict(), strict=False)
        assert unexpected == [] and missing == ([] if kernel == 0 else ["attn.conv"])
        with torch.no_grad():
            outs.append(run_module(conv, x, [5, 9])[0])
    # the identity taps give the projections to rounding (conv1d's own summation), the memory then amplifies
    assert_close(outs[1], outs[0], **placement_op(mod))


def test_the_memory_conv_starts_as_the_identity_outside_weight_decay(x):
    """conv_init="identity" (the default): each token's q/k/v start as its own projection, exactly (the taps
    are 0 and 1, exact in any float), and the taps are exempt from weight decay; "uniform" is nn.Conv1d's
    init, mixing the tokens, with the default decay."""
    mem = NeuralMemory(D, H, TitansConfig(**SMALL))
    context = torch.zeros(2, mem.config.conv_kernel - 1, 3 * D)
    y, _ = mem._project(x, context, slice(None))
    assert torch.equal(y, F.silu(F.linear(x, mem.qkv.weight)))
    uniform = NeuralMemory(D, H, TitansConfig(**SMALL, conv_init="uniform"))
    uniform.qkv.load_state_dict(mem.qkv.state_dict())
    y_uniform, _ = uniform._project(x, context, slice(None))
    assert (y_uniform - y).abs().max() > 0.1  # the mixing conv moves the projections by their own scale
    bound = uniform.config.conv_kernel**-0.5
    assert uniform.conv.abs().max() <= bound and uniform.conv[:, :-1].abs().max() > 0

    def conv_decay(memory):
        (group,) = [g for g in param_groups(memory, lr=1e-3, weight_decay=0.1) if any(p is memory.conv for p in g["params"])]
        return group["weight_decay"]

    assert conv_decay(mem) == 0.0 and conv_decay(uniform) == 0.1
    with pytest.raises(ValueError, match="conv_init"):
        TitansConfig(conv_init="zeros")


def test_config_errors():
    with pytest.raises(ValueError, match="attn_conv_kernel"):
        TitansMAGConfig(attn_conv_kernel=1)
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        TitansMACConfig(segment_len=10, chunk_size=4)
    with pytest.raises(ValueError, match="lr_init < max_lr"):
        TitansConfig(lr_init=0.5, max_lr=0.1)
    for momentum_init in (0.9, 0.95):  # equal to the cap, or above it
        with pytest.raises(ValueError, match="momentum_init < max_momentum"):
            TitansMAGConfig(momentum_init=momentum_init, max_momentum=0.9)
    with pytest.raises(ValueError, match="max_momentum"):
        TitansConfig(max_momentum=1.5)


def _gates_before_max_momentum(self, x):
    """NeuralMemory._gates as it was before max_momentum: eta a plain sigmoid."""
    xf = x.float()
    eta, theta, alpha = (torch.sigmoid(F.linear(xf, lin.weight, lin.bias)) for lin in (self.eta, self.theta, self.alpha))
    return rearrange(torch.stack([eta, self.config.max_lr * theta, alpha], dim=-1), "b n h three -> b h n three")


def test_max_momentum_default_is_the_plain_sigmoid_bit_for_bit(x, monkeypatch):
    """max_momentum=1.0 (the default) computes exactly what memzoo computed before it: same eta bias at
    initialisation and the same outputs, bit for bit (shipped checkpoints load and compute as before)."""
    torch.manual_seed(0)
    mod = perturbed(TitansMAG(D, H, TitansMAGConfig(window=6, n_persistent=2, **SMALL)))
    assert mod.config.max_momentum == 1.0
    # the bias before: logit(momentum_init)
    assert torch.equal(mod.memory.eta.bias, torch.full_like(mod.memory.eta.bias, math.log(0.8 / (1 - 0.8))))
    with torch.no_grad():
        torch.nn.init.normal_(mod.memory.eta.weight, std=3.0)  # eta spread over (0, 1)
        new, _ = run_module(mod, x, [4, 9])
        monkeypatch.setattr(NeuralMemory, "_gates", _gates_before_max_momentum)
        old, _ = run_module(mod, x, [4, 9])
    torch.testing.assert_close(new, old, atol=0, rtol=0)  # x 1.0 is exact in IEEE arithmetic


def test_max_momentum_caps_eta_even_with_huge_gate_logits(x):
    """eta = max_momentum * sigmoid(.): momentum_init is relative to the cap, and however large the gate's
    logits grow eta never exceeds max_momentum (at 1.0 it reaches exactly 1 in fp32: momentum that never decays)."""
    torch.manual_seed(0)
    mem = NeuralMemory(D, H, TitansConfig(**SMALL, max_momentum=0.9))
    assert_close(0.9 * torch.sigmoid(mem.eta.bias), torch.full((H,), 0.8))  # momentum_init, relative to the cap
    with torch.no_grad():
        mem.eta.weight.normal_(std=1e3)
        mem.eta.bias.fill_(1e4)
        eta = mem._gates(x)[..., 0]
    assert bool((eta <= torch.tensor(0.9)).all()) and bool((eta >= 0).all())  # logits of +-1e4: both ends saturate
    assert float(eta.max()) == float(torch.tensor(0.9))  # saturated at the cap (0.9 in fp32), not above it
    uncapped = NeuralMemory(D, H, TitansConfig(**SMALL))
    uncapped.load_state_dict(mem.state_dict())
    with torch.no_grad():
        assert float(uncapped._gates(x)[..., 0].max()) == 1.0  # the default: exactly 1


@pytest.mark.parametrize("design", ["titans-lmm", "titans-mac", "titans-mag", "titans-mal", "infini", "infini-deltanet"])
def test_the_learning_check_runs_and_knocks_the_memory_out(design, tmp_path):
    """Two steps of the recipe (its minutes-long run is the real check): it trains, evaluates both ways, writes JSON."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "recipes" / "memory_learning_check.py"
    spec = importlib.util.spec_from_file_location("memory_learning_check", path)
    recipe = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = recipe  # its dataclasses look their module up there
    spec.loader.exec_module(recipe)
    cfg = recipe.CheckConfig(design=design, d_model=16, n_layers=1, segment_len=16, n_segments=3, batch_size=4, steps=2,
                             warmup_steps=1, eval_streams=8, eval_segments=(3,))  # fmt: skip
    result = recipe.run(cfg, out=tmp_path / "r.json")
    assert result["steps"] == 2 and len(result["accuracy_per_query_3seg_knocked_out"]) == 2
    assert json.loads((tmp_path / "r.json").read_text())["accuracy_with_memory"] == result["accuracy_with_memory"]


def test_the_learning_checks_facts_are_where_the_queries_ask_for_them():
    """With several facts, segment 1 holds ``MARK key v`` triples with distinct keys, and each later segment ends
    ``key QUERY`` whose label (the token after the query) is that key's value: the answer exists only in segment 1."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "recipes" / "memory_learning_check.py"
    spec = importlib.util.spec_from_file_location("memory_learning_check", path)
    recipe = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = recipe
    spec.loader.exec_module(recipe)
    cfg = recipe.CheckConfig(segment_len=16, n_facts=4)
    batch = recipe.make_batch(cfg, 8, 3, torch.Generator().manual_seed(0))
    ids, labels = batch["input_ids"], batch["labels"]
    for row in range(8):
        first = ids[row, :16].tolist()
        marks = [i for i, t in enumerate(first) if t == recipe.MARK]
        facts = {first[i + 1]: first[i + 2] for i in marks}
        assert len(marks) == 4 and len(facts) == 4  # four triples, distinct keys
        for q in (31, 47):  # the last token of segments 2 and 3
            assert ids[row, q] == recipe.QUERY and labels[row, q + 1] == facts[int(ids[row, q - 1])]
    assert (labels != recipe.IGNORE_INDEX).sum() == 8 * 2
    with pytest.raises(ValueError, match="facts need"):
        recipe.make_batch(recipe.CheckConfig(segment_len=8, n_facts=4), 2, 2, torch.Generator())
