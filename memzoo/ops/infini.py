"""Infini-attention maths: compressive memory read/write, local attention, gate; naive and batched.

Per head, the stream is cut into segments of ``s`` tokens. Inside a segment, causal softmax
attention with RoPE on segment-local positions gives ``A_dot``; every token also reads the
compressive memory as it was at the segment's start, ``A_mem = s(Q) M / (s(Q) z)`` with
``s = ELU + 1`` and no position encoding; when the segment is complete it is written:

    linear:  M <- M + s(K)^T V                                  z <- z + sum_t s(K_t)
    delta:   M <- M + s(K)^T (V - s(K) M / (s(K) z))            z <- z + sum_t s(K_t)

and the two reads are mixed per head: ``A = sigmoid(beta) A_mem + (1 - sigmoid(beta)) A_dot``.

Empty memory: at the start of a stream ``M = 0`` and ``z = 0``, so ``s(Q) z = 0``. The
denominator is clamped at :data:`EPS`; the numerator is exactly 0 then, so the read is exactly 0
("retrieval from an empty memory contributes nothing": ``A = (1 - sigmoid(beta)) A_dot``), with no
NaN in the forward or the backward pass. Once anything is written, ``z`` is a sum of positive
vectors (``s > 0``), so the clamp is inactive in practice.

Precision: memory maths runs with autocast disabled, in ``promote_types(M.dtype, float32)``
(fp32, or fp64 for gradcheck), whatever the dtype of ``q, k, v``: the sums over thousands of
segments would lose the needle in bf16.

Two forms: :func:`infini_attention_naive` follows the equations segment by segment, query by
query and token-sum by token-sum (the reference); :func:`infini_attention` is the batched form the
module uses (all segments' local attention in one call, the memory read of every segment as one
einsum, the linear rule as a cumulative sum). Tests hold them together.

Reference: Munkhdalai et al., "Leave No Context Behind" (arXiv 2404.07143), section 2.1.2:
memory retrieval, linear update, delta update and long-term context injection (numbered here eqs. 7-10,
counting the projection, attention and gate formulas before them), with A_dot from section 2.1.1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import Tensor

from .attention import attend
from .rope import apply_rope

__all__ = [
    "EPS",
    "sigma",
    "memory_read",
    "memory_write",
    "memory_scan",
    "local_attention",
    "gate_mix",
    "infini_attention",
    "infini_attention_naive",
]

#: floor of the read-out denominators s(Q) z and s(K) z (only reached by an empty memory)
EPS = 1e-6


def sigma(x: Tensor) -> Tensor:
    """The memory's feature map, ELU + 1 (positive, so ``z`` only grows)."""
    return F.elu(x) + 1.0


def _memory_dtype(M: Tensor) -> torch.dtype:
    return torch.promote_types(M.dtype, torch.float32)


def memory_read(q: Tensor, M: Tensor, z: Tensor) -> Tensor:
    """Read the compressive memory: ``s(Q) M / (s(Q) z)``; exactly 0 from an empty memory.

    Args:
        q: [b, h, ..., s, k] queries (un-rotated: the memory path has no positions).
        M: [b, h, ..., k, v] memory (the same leading dims as ``q``, e.g. one memory per segment).
        z: [b, h, ..., k] normaliser.

    Returns:
        [b, h, ..., s, v] in fp32 (or fp64 if ``M`` is fp64).

    Reference: arXiv 2404.07143, section 2.1.2, memory retrieval.
    """
    dtype = _memory_dtype(M)
    with torch.autocast(q.device.type, enabled=False):
        sq = sigma(q.to(dtype))
        num = einsum(sq, M.to(dtype), "... s k, ... k v -> ... s v")
        den = einsum(sq, z.to(dtype), "... s k, ... k -> ... s")
        return num / den.clamp_min(EPS)[..., None]


def memory_write(k: Tensor, v: Tensor, M: Tensor, z: Tensor, *, delta: bool) -> tuple[Tensor, Tensor]:
    """Write one complete segment into the memory (out of place).

    Args:
        k: [b, h, s, k] the segment's un-rotated keys.
        v: [b, h, s, v] its values.
        M: [b, h, k, v], z: [b, h, k] the memory before the segment.
        delta: the delta rule (write only what the memory does not already return for each key)
            instead of the linear rule.

    Returns:
        The new ``M`` [b, h, k, v] and ``z`` [b, h, k], fp32 (or fp64).

    Reference: arXiv 2404.07143, section 2.1.2, linear and delta memory updates.
    """
    dtype = _memory_dtype(M)
    with torch.autocast(k.device.type, enabled=False):
        sk, v, M, z = sigma(k.to(dtype)), v.to(dtype), M.to(dtype), z.to(dtype)
        if delta:
            v = v - memory_read(k, M, z)  # the new part of each value: V - s(K) M / (s(K) z)
        return M + einsum(sk, v, "b h s k, b h s v -> b h k v"), z + sk.sum(dim=-2)


def memory_scan(
    k: Tensor,
    v: Tensor,
    M: Tensor,
    z: Tensor,
    *,
    delta: bool,
    detach_every: int = 0,
    segments_done: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Write ``g`` consecutive complete segments; return what each one read and the final memory.

    The linear rule is a cumulative sum over segments (no loop); the delta rule depends on the
    memory before each segment, so it loops over segments (only the small [k, v] update is
    sequential: the reads of all segments are then one einsum).

    Args:
        k: [b, h, g, s, k] un-rotated keys of g segments; v: [b, h, g, s, v].
        M: [b, h, k, v], z: [b, h, k] the memory before the first of them.
        delta: delta rule instead of linear.
        detach_every: if > 0, cut the autograd graph of the memory after every ``detach_every``-th
            segment of the stream (truncated back-propagation through the memory).
        segments_done: segments of the stream completed before these (to place the cuts).

    Returns:
        ``M_read`` [b, h, g, k, v] and ``z_read`` [b, h, g, k], the memory each segment reads
        (before its own write), and the final ``M`` [b, h, k, v], ``z`` [b, h, k].
    """
    dtype = _memory_dtype(M)
    M, z = M.to(dtype), z.to(dtype)
    if not delta and detach_every <= 0:
        with torch.autocast(k.device.type, enabled=False):
            sk = sigma(k.to(dtype))
            dM = einsum(sk, v.to(dtype), "b h g s k, b h g s v -> b h g k v").cumsum(dim=2)  # after each segment
            dz = sk.sum(dim=-2).cumsum(dim=2)  # [b, h, g, k]
            M_after, z_after = M.unsqueeze(2) + dM, z.unsqueeze(2) + dz
            M_read = torch.cat([M.unsqueeze(2), M_after[:, :, :-1]], dim=2)
            z_read = torch.cat([z.unsqueeze(2), z_after[:, :, :-1]], dim=2)
            return M_read, z_read, M_after[:, :, -1], z_after[:, :, -1]
    M_read, z_read = [], []
    for i in range(k.shape[2]):
        M_read.append(M)
        z_read.append(z)
        M, z = memory_write(k[:, :, i], v[:, :, i], M, z, delta=delta)
        if detach_every > 0 and (segments_done + i + 1) % detach_every == 0:
            M, z = M.detach(), z.detach()
    return torch.stack(M_read, dim=2), torch.stack(z_read, dim=2), M, z


def local_attention(q: Tensor, k: Tensor, v: Tensor, *, rope_theta: float = 10000.0) -> Tensor:
    """Causal softmax attention inside one segment, RoPE on segment-local positions.

    The ``t`` keys are the segment's first ``t`` tokens (positions ``0 .. t-1``); the ``s <= t``
    queries are its tokens ``t-s .. t-1`` (bottom-right alignment, as in :func:`attend`), so a
    segment can be processed in pieces.

    Args:
        q: [b, h, s, k] un-rotated queries; k: [b, h, t, k] un-rotated keys; v: [b, h, t, v].
        rope_theta: RoPE base.

    Returns:
        A_dot [b, h, s, v].

    Reference: arXiv 2404.07143, section 2.1.1 (scaled dot-product attention).
    """
    s, t = q.shape[2], k.shape[2]
    pos = torch.arange(t, device=q.device)
    return attend(apply_rope(q, pos[t - s :], rope_theta), apply_rope(k, pos, rope_theta), v.to(q.dtype))


def gate_mix(a_mem: Tensor, a_dot: Tensor, beta: Tensor) -> Tensor:
    """``sigmoid(beta) A_mem + (1 - sigmoid(beta)) A_dot``, one gate per head.

    Args:
        a_mem: [b, h, ..., v] memory read; a_dot: [b, h, ..., v] local attention (same shape).
        beta: [h] gate logits.

    Returns:
        [b, h, ..., v] in the wider of the two dtypes.

    Reference: arXiv 2404.07143, section 2.1.2, long-term context injection.
    """
    g = beta.sigmoid().reshape(-1, *(1,) * (a_mem.dim() - 2))  # [h, 1, ...]
    return g * a_mem + (1 - g) * a_dot


def infini_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    M: Tensor,
    z: Tensor,
    beta: Tensor,
    *,
    segment_len: int,
    delta: bool,
    rope_theta: float = 10000.0,
    detach_every: int = 0,
    segments_done: int = 0,
    write: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Batched Infini-attention over tokens that start at a segment boundary.

    The ``n`` tokens are ``g = n // s`` complete segments and a tail of ``n % s`` tokens. All
    complete segments attend locally in one call (segments folded into the batch); each reads the
    memory from before it; the tail reads the memory after the complete segments and is not
    written (the module keeps it in its state until its segment completes).

    Args:
        q, k: [b, h, n, k] un-rotated queries and keys; v: [b, h, n, v].
        M: [b, h, k, v], z: [b, h, k] the memory before these tokens.
        beta: [h] gate logits.
        segment_len: s.
        delta: delta rule instead of linear.
        rope_theta: RoPE base of the local attention.
        detach_every, segments_done: see :func:`memory_scan`.
        write: False = the memory-off control: no segment writes, each reads ``M``, ``z`` as given.

    Returns:
        A [b, h, n, v] (the wider of q's dtype and fp32), and the memory ``M``, ``z`` after the
        complete segments.

    Reference: arXiv 2404.07143, section 2.1 (all of it, segment-batched).
    """
    n, S = q.shape[2], segment_len
    g, r = divmod(n, S)
    outs = []
    if g:
        qs, ks, vs = (rearrange(t[:, :, : g * S], "b h (g s) k -> b h g s k", s=S) for t in (q, k, v))
        if write:
            M_read, z_read, M, z = memory_scan(ks, vs, M, z, delta=delta, detach_every=detach_every, segments_done=segments_done)
        else:
            M_read, z_read = M[:, :, None].expand(-1, -1, g, -1, -1), z[:, :, None].expand(-1, -1, g, -1)
        a_mem = memory_read(qs, M_read, z_read)  # [b, h, g, s, v]
        fold = "b h g s k -> (b g) h s k"
        a_dot = local_attention(rearrange(qs, fold), rearrange(ks, fold), rearrange(vs, fold), rope_theta=rope_theta)
        a_dot = rearrange(a_dot, "(b g) h s v -> b h g s v", g=g)
        outs.append(rearrange(gate_mix(a_mem, a_dot, beta), "b h g s v -> b h (g s) v"))
    if r:
        qt, kt, vt = (t[:, :, g * S :] for t in (q, k, v))
        outs.append(gate_mix(memory_read(qt, M, z), local_attention(qt, kt, vt, rope_theta=rope_theta), beta))
    return torch.cat(outs, dim=2), M, z


def infini_attention_naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    M: Tensor,
    z: Tensor,
    beta: Tensor,
    *,
    segment_len: int,
    delta: bool,
    rope_theta: float = 10000.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference form of :func:`infini_attention`: segment by segment, query by query, token-sum by token-sum.

    Nothing is batched over time and no helper of the fast form is used for the maths (only RoPE):
    for each query, an explicit causal softmax over the segment's earlier keys and an explicit
    memory read; after each complete segment, the update summed one token at a time.

    Args and returns: as :func:`infini_attention` (no truncation options: reference only).

    Reference: arXiv 2404.07143, sections 2.1.1 and 2.1.2, as written.
    """
    n, dk = q.shape[2], q.shape[3]
    dtype = _memory_dtype(M)
    M, z = M.to(dtype), z.to(dtype)
    gate = beta.to(dtype).sigmoid()[None, :, None]  # [1, h, 1]
    outs = []
    for start in range(0, n, segment_len):
        end = min(start + segment_len, n)
        pos = torch.arange(end - start, device=q.device)
        qr, kr = apply_rope(q[:, :, start:end], pos, rope_theta), apply_rope(k[:, :, start:end], pos, rope_theta)
        for i in range(end - start):
            # A_dot: softmax(q_i K_{<=i}^T / sqrt(k)) V_{<=i}, within the segment
            scores = einsum(qr[:, :, i].to(dtype), kr[:, :, : i + 1].to(dtype), "b h k, b h j k -> b h j") / math.sqrt(dk)
            a_dot = einsum(scores.softmax(dim=-1), v[:, :, start : start + i + 1].to(dtype), "b h j, b h j v -> b h v")
            # A_mem: s(q_i) M_{s-1} / (s(q_i) z_{s-1}), the memory of the segment's start
            sq = sigma(q[:, :, start + i].to(dtype))
            num = einsum(sq, M, "b h k, b h k v -> b h v")
            den = einsum(sq, z, "b h k, b h k -> b h")
            a_mem = num / den.clamp_min(EPS)[..., None]
            outs.append(gate * a_mem + (1 - gate) * a_dot)
        if end - start == segment_len:  # a complete segment is written, one token's term at a time
            dM, dz = torch.zeros_like(M), torch.zeros_like(z)
            for t in range(start, end):
                sk = sigma(k[:, :, t].to(dtype))  # [b, h, k]
                new = v[:, :, t].to(dtype)
                if delta:  # subtract what the memory of the segment's start already returns for k_t
                    new = new - einsum(sk, M, "b h k, b h k v -> b h v") / einsum(sk, z, "b h k, b h k -> b h").clamp_min(EPS)[..., None]
                dM = dM + einsum(sk, new, "b h k, b h v -> b h k v")
                dz = dz + sk
            M, z = M + dM, z + dz
    return torch.stack(outs, dim=2), M, z
