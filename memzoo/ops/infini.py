"""Infini-attention maths: compressive memory read/write, local attention, gate; naive and batched.

Per head, the stream is cut into segments of ``s`` tokens. Inside a segment, causal softmax
attention with RoPE on segment-local positions gives ``A_dot``; every token also reads the
compressive memory as it was at the segment's start, ``A_mem = s(Q) M / (s(Q) z)`` with
``s = ELU + 1`` and no position encoding; when the segment is complete it is written:

    linear:  M <- M + s(K)^T V                                  z <- z + sum_t s(K_t)
    delta:   M <- M + s(K)^T (V - s(K) M / (s(K) z))            z <- z + sum_t s(K_t)

and the two reads are mixed per head: ``A = sigmoid(beta) A_mem + (1 - sigmoid(beta)) A_dot``.

That is the paper, and the default :class:`MemoryRule`. The rule's other settings are what the
linear-RNN literature shows makes such a memory retrieve (DeltaNet, Yang et al. 2024, arXiv
2406.06484; Gated DeltaNet, arXiv 2412.06464):

- ``feature_map="silu-l2"``: ``phi(x) = SiLU(x) / ||SiLU(x)||`` instead of ELU + 1. Unit keys make
  a write to one key disturb the others only through their overlap; ELU + 1 features are all
  positive, so every key overlaps every other one.
- ``normalize=False``: the read is ``phi(Q) M`` (and the delta rule subtracts ``phi(K) M``): no
  ``z`` that grows with every token, so a fact written once is not diluted as ~1/T.
- ``update_rule="deltanet"``: the delta rule token by token, ``M_t = M_{t-1} + b_t phi(k_t)^T (v_t -
  phi(k_t) M_{t-1})``; with unit keys and ``b_t`` in (0, 1) every step is a contraction towards
  the new pair, so ``M`` stays bounded over any number of writes. The paper's delta rule
  subtracts what the memory of the segment's *start* returns, so 256 tokens with one key write
  256 times the same correction. A segment is written at once through the triangular system
  ``(I + diag(b) tril(phi(K) phi(K)^T, -1)) U = diag(b) (V - phi(K) M)``, ``M <- M + phi(K)^T U``
  (the chunkwise form of DeltaNet).
- a per-token write strength ``b_t`` (``strength``), computed by the module; 1 if none.
- a per-token decay ``alpha_t = exp(g_t)`` of the memory before each write (``decay``, the log
  decays ``g_t <= 0``; Gated DeltaNet, arXiv 2412.06464), DeltaNet's rule only:
  ``M_t = alpha_t M_{t-1} + b_t phi(k_t)^T (v_t - alpha_t phi(k_t) M_{t-1})``, so what filler
  wrote fades while the model can hold ``alpha_t`` at 1 over what it must keep. A sub-chunk is
  still one triangular system: with ``gamma_t = prod_{i <= t} alpha_i`` (from the sub-chunk's
  start) the off-diagonal terms are weighted by ``gamma_t / gamma_j`` and the start's memory by
  ``gamma_t``.

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
einsum, the linear rule as a cumulative sum, DeltaNet's triangular solves of all segments in one
call). Tests hold them together.

Reference: Munkhdalai et al., "Leave No Context Behind" (arXiv 2404.07143), section 2.1.2:
memory retrieval, linear update, delta update and long-term context injection (numbered here eqs. 7-10,
counting the projection, attention and gate formulas before them), with A_dot from section 2.1.1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import Tensor

from .attention import attend
from .rope import apply_rope

__all__ = [
    "EPS",
    "DELTANET_CHUNK",
    "FEATURE_MAPS",
    "UPDATE_RULES",
    "MemoryRule",
    "PAPER",
    "sigma",
    "features",
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

#: the memory path's feature maps: the paper's ELU + 1, and SiLU then L2 normalisation (DeltaNet's)
FEATURE_MAPS = ("elu+1", "silu-l2")

#: the memory's update rules: the paper's two, and DeltaNet's token-by-token delta rule
UPDATE_RULES = ("delta", "linear", "deltanet")


@dataclass(frozen=True)
class MemoryRule:
    """How the compressive memory is written and read.

    Attributes:
        update_rule: ``"delta"`` (the paper's: each token of a segment writes what the memory of the
            segment's start does not return for its key), ``"linear"`` (``M += phi(K)^T V``) or
            ``"deltanet"`` (the delta rule token by token: each write sees the one before).
        feature_map: ``"elu+1"`` (the paper's) or ``"silu-l2"`` (unit-norm keys and queries).
        normalize: divide reads by ``phi(q) z`` (the paper). ``"silu-l2"`` features can sum to 0,
            so they need ``normalize=False``, and so does ``"deltanet"`` (its memory is a
            regression onto the values, already at their scale).
    """

    update_rule: str = "delta"
    feature_map: str = "elu+1"
    normalize: bool = True

    def __post_init__(self):
        if self.update_rule not in UPDATE_RULES:
            raise ValueError(f"update_rule must be one of {UPDATE_RULES}, got {self.update_rule!r}")
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {self.feature_map!r}")
        if self.normalize and self.feature_map != "elu+1":
            raise ValueError(
                f"feature_map={self.feature_map!r} has features of either sign, so phi(q) z can be 0: "
                "set normalize to false (the read is then phi(q) M)"
            )
        if self.update_rule == "deltanet" and (self.normalize or self.feature_map != "silu-l2"):
            raise ValueError(
                "update_rule='deltanet' needs unit keys and no normaliser (each step is then a contraction): "
                "set feature_map to 'silu-l2' and normalize to false"
            )


#: the paper's rule (the default of ``infini``)
PAPER = MemoryRule()


def sigma(x: Tensor) -> Tensor:
    """The paper's feature map, ELU + 1 (positive, so ``z`` only grows)."""
    return F.elu(x) + 1.0


def features(x: Tensor, feature_map: str) -> Tensor:
    """The memory path's features of keys or queries ``x`` [..., k] (see :data:`FEATURE_MAPS`)."""
    if feature_map == "elu+1":
        return sigma(x)
    return F.normalize(F.silu(x), dim=-1)


def _memory_dtype(M: Tensor) -> torch.dtype:
    return torch.promote_types(M.dtype, torch.float32)


def _read(fq: Tensor, M: Tensor, z: Tensor, normalize: bool) -> Tensor:
    """``fq M`` (over ``fq z`` if ``normalize``), for features ``fq`` already computed."""
    num = einsum(fq, M, "... s k, ... k v -> ... s v")
    if not normalize:
        return num
    return num / einsum(fq, z, "... s k, ... k -> ... s").clamp_min(EPS)[..., None]


def memory_read(q: Tensor, M: Tensor, z: Tensor, rule: MemoryRule = PAPER) -> Tensor:
    """Read the compressive memory: ``phi(Q) M / (phi(Q) z)`` (or ``phi(Q) M``); exactly 0 from an empty memory.

    Args:
        q: [b, h, ..., s, k] queries (un-rotated: the memory path has no positions).
        M: [b, h, ..., k, v] memory (the same leading dims as ``q``, e.g. one memory per segment).
        z: [b, h, ..., k] normaliser.
        rule: the feature map and normaliser (:class:`MemoryRule`; the paper's by default).

    Returns:
        [b, h, ..., s, v] in fp32 (or fp64 if ``M`` is fp64).

    Reference: arXiv 2404.07143, section 2.1.2, memory retrieval.
    """
    dtype = _memory_dtype(M)
    with torch.autocast(q.device.type, enabled=False):
        return _read(features(q.to(dtype), rule.feature_map), M.to(dtype), z.to(dtype), rule.normalize)


def _strength(strength: Tensor | None, like: Tensor) -> Tensor:
    """Per-token write strengths [b, h, ..., s] in the memory's dtype (ones if none)."""
    if strength is None:
        return torch.ones(like.shape[:-1], dtype=like.dtype, device=like.device)
    return strength.to(like.dtype)


#: tokens per DeltaNet sub-chunk: a segment is written as ceil(s / c) triangular systems of c
#: tokens applied in turn (exactly the token-by-token recurrence); one system of s = 256 tokens
#: costs ~4x the multiply-adds of four of 64 (``recipes/bench_infini.py --deltanet-chunk`` times both)
DELTANET_CHUNK = 64


def _deltanet_factors(fk: Tensor, v: Tensor, b: Tensor, g: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """DeltaNet's factors of each sub-chunk: ``W_k = A^-1 diag(b gamma) phi(K)`` and ``W_v = A^-1 diag(b) V``.

    ``A = I + diag(b) tril(Gamma * phi(K) phi(K)^T, -1)`` (unit lower triangular) with
    ``Gamma_tj = gamma_t / gamma_j`` and ``gamma_t`` the product of the decays from the sub-chunk's
    start to token t (all 1 without decay), so a sub-chunk written into memory ``M`` gives
    ``gamma_c M + (phi(K) gamma_c / gamma)^T (W_v - W_k M)``. Neither factor depends on ``M``: the
    factors of every sub-chunk of every segment are one batched triangular solve.

    Args:
        fk: [..., s, k] key features; v: [..., s, v]; b: [..., s] write strengths; g: [..., s] log
            decays (<= 0), or None for no decay.

    Returns:
        The keys that write (``phi(K)`` weighted by ``gamma_c / gamma``), ``W_k``, ``W_v``, cut into
        sub-chunks of :data:`DELTANET_CHUNK` tokens (the last padded with zero keys of strength 0 and
        decay 1, which change nothing): [..., n, c, k], [..., n, c, k], [..., n, c, v]; and the
        sub-chunks' decays ``gamma_c`` [..., n] (None without decay).
    """
    s, chunk = fk.shape[-2], DELTANET_CHUNK
    n = -(-s // chunk)
    if n * chunk > s:
        pad = n * chunk - s
        fk, v, b = F.pad(fk, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad)), F.pad(b, (0, pad))
        g = None if g is None else F.pad(g, (0, pad))
    fk, v = (t.reshape(*t.shape[:-2], n, chunk, t.shape[-1]) for t in (fk, v))
    b = b.reshape(*b.shape[:-1], n, chunk)
    lower = torch.tril(einsum(fk, fk, "... i k, ... j k -> ... i j"), diagonal=-1)
    rhs_k, write_k, gamma_c = fk, fk, None
    if g is not None:
        L = g.reshape(*g.shape[:-1], n, chunk).cumsum(dim=-1)  # log gamma_t within the sub-chunk
        below = torch.ones(chunk, chunk, dtype=torch.bool, device=fk.device).tril(-1)
        lower = lower * torch.where(below, L[..., :, None] - L[..., None, :], -torch.inf).exp()  # gamma_t / gamma_j <= 1
        rhs_k, write_k = L.exp()[..., None] * fk, (L[..., -1:] - L).exp()[..., None] * fk
        gamma_c = L[..., -1].exp()
    A = torch.eye(chunk, dtype=fk.dtype, device=fk.device) + b[..., None] * lower
    W = torch.linalg.solve_triangular(A, b[..., None] * torch.cat([rhs_k, v], dim=-1), upper=False, unitriangular=True)
    return write_k, W[..., : fk.shape[-1]], W[..., fk.shape[-1] :], gamma_c


def _deltanet_write(fk: Tensor, Wk: Tensor, Wv: Tensor, M: Tensor, gamma: Tensor | None = None) -> Tensor:
    """One segment's sub-chunks [b, h, n, c, *] (from :func:`_deltanet_factors`) written into ``M`` [b, h, k, v], in turn."""
    for j in range(fk.shape[2]):
        start = M if gamma is None else gamma[:, :, j, None, None] * M
        M = start + einsum(fk[:, :, j], Wv[:, :, j] - einsum(Wk[:, :, j], M, "b h c k, b h k v -> b h c v"), "b h c k, b h c v -> b h k v")
    return M


def memory_write(
    k: Tensor, v: Tensor, M: Tensor, z: Tensor, rule: MemoryRule = PAPER, strength: Tensor | None = None, decay: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Write one complete segment into the memory (out of place).

    Args:
        k: [b, h, s, k] the segment's un-rotated keys.
        v: [b, h, s, v] its values.
        M: [b, h, k, v], z: [b, h, k] the memory before the segment.
        rule: the update rule, feature map and normaliser (:class:`MemoryRule`).
        strength: [b, h, s] per-token write strengths (None: 1). ``z`` grows by ``sum_t b_t phi(k_t)``.
        decay: [b, h, s] per-token log decays (``deltanet`` only; None: no decay).

    Returns:
        The new ``M`` [b, h, k, v] and ``z`` [b, h, k], fp32 (or fp64).

    Reference: arXiv 2404.07143, section 2.1.2, linear and delta memory updates; DeltaNet
    (arXiv 2406.06484), its chunkwise form.
    """
    def one(t: Tensor | None) -> Tensor | None:
        return None if t is None else t[:, :, None]

    _, _, M, z = memory_scan(k[:, :, None], v[:, :, None], M, z, rule, one(strength), decay=one(decay))
    return M, z


def memory_scan(
    k: Tensor,
    v: Tensor,
    M: Tensor,
    z: Tensor,
    rule: MemoryRule = PAPER,
    strength: Tensor | None = None,
    *,
    decay: Tensor | None = None,
    detach_every: int = 0,
    segments_done: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Write ``g`` consecutive complete segments; return what each one read and the final memory.

    The linear rule is a cumulative sum over segments (no loop); the delta rules depend on the
    memory before each segment, so they loop over segments (only the small [k, v] update is
    sequential: the reads of all segments are then one einsum, and DeltaNet's triangular solves
    are batched over segments before the loop). Every rule's update is written here once;
    :func:`memory_write` is this scan over one segment.

    Args:
        k: [b, h, g, s, k] un-rotated keys of g segments; v: [b, h, g, s, v].
        M: [b, h, k, v], z: [b, h, k] the memory before the first of them.
        rule: :class:`MemoryRule`.
        strength: [b, h, g, s] per-token write strengths (None: 1).
        decay: [b, h, g, s] per-token log decays ``g_t <= 0`` of the memory (``deltanet`` only; None: no decay).
        detach_every: if > 0, cut the autograd graph of the memory after every ``detach_every``-th
            segment of the stream (truncated back-propagation through the memory).
        segments_done: segments of the stream completed before these (to place the cuts).

    Returns:
        ``M_read`` [b, h, g, k, v] and ``z_read`` [b, h, g, k], the memory each segment reads
        (before its own write), and the final ``M`` [b, h, k, v], ``z`` [b, h, k].
    """
    if decay is not None and rule.update_rule != "deltanet":
        raise ValueError(f"a decay needs update_rule='deltanet' (Gated DeltaNet), got {rule.update_rule!r}")
    dtype = _memory_dtype(M)
    M, z = M.to(dtype), z.to(dtype)
    with torch.autocast(k.device.type, enabled=False):
        fk, v = features(k.to(dtype), rule.feature_map), v.to(dtype)
        b = _strength(strength, fk)
        dz = einsum(b, fk, "b h g s, b h g s k -> b h g k")
        if rule.update_rule == "linear" and detach_every <= 0:
            dM = einsum(fk, b[..., None] * v, "b h g s k, b h g s v -> b h g k v").cumsum(dim=2)  # after each segment
            M_after, z_after = M.unsqueeze(2) + dM, z.unsqueeze(2) + dz.cumsum(dim=2)
            M_read = torch.cat([M.unsqueeze(2), M_after[:, :, :-1]], dim=2)
            z_read = torch.cat([z.unsqueeze(2), z_after[:, :, :-1]], dim=2)
            return M_read, z_read, M_after[:, :, -1], z_after[:, :, -1]
        if rule.update_rule == "deltanet":
            *chunks, gammas = _deltanet_factors(fk, v, b, None if decay is None else decay.to(dtype))  # [b, h, g, n, c, *]: all at once
        M_read, z_read = [], []
        for i in range(k.shape[2]):
            M_read.append(M)
            z_read.append(z)
            if rule.update_rule == "deltanet":
                M = _deltanet_write(*(t[:, :, i] for t in chunks), M, None if gammas is None else gammas[:, :, i])
            else:
                new = v[:, :, i]
                if rule.update_rule == "delta":  # the new part of each value: V - phi(K) M (/ phi(K) z)
                    new = new - _read(fk[:, :, i], M, z, rule.normalize)
                M = M + einsum(fk[:, :, i], b[:, :, i, :, None] * new, "b h s k, b h s v -> b h k v")
            z = z + dz[:, :, i]
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


def gate_mix(a_mem: Tensor, a_dot: Tensor, beta: Tensor | None) -> Tensor:
    """``sigmoid(beta) A_mem + (1 - sigmoid(beta)) A_dot``, one gate per head; ``[A_dot | A_mem]`` without a gate.

    Args:
        a_mem: [b, h, ..., v] memory read; a_dot: [b, h, ..., v] local attention (same shape).
        beta: [h] gate logits, or None: no mix, the two reads side by side on the last dim
            ([b, h, ..., 2v], local first), for a module that projects each with its own matrix.

    Returns:
        [b, h, ..., v] (or [..., 2v]) in the wider of the two dtypes.

    Reference: arXiv 2404.07143, section 2.1.2, long-term context injection.
    """
    if beta is None:
        dtype = torch.promote_types(a_mem.dtype, a_dot.dtype)
        return torch.cat([a_dot.to(dtype), a_mem.to(dtype)], dim=-1)
    g = beta.sigmoid().reshape(-1, *(1,) * (a_mem.dim() - 2))  # [h, 1, ...]
    return g * a_mem + (1 - g) * a_dot


def infini_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    M: Tensor,
    z: Tensor,
    beta: Tensor | None,
    *,
    segment_len: int,
    rule: MemoryRule = PAPER,
    strength: Tensor | None = None,
    decay: Tensor | None = None,
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
        beta: [h] gate logits, or None (see :func:`gate_mix`).
        segment_len: s.
        rule: :class:`MemoryRule` (the paper's delta rule by default).
        strength: [b, h, n] per-token write strengths (None: 1).
        decay: [b, h, n] per-token log decays of the memory (``deltanet`` only; None: no decay).
        rope_theta: RoPE base of the local attention.
        detach_every, segments_done: see :func:`memory_scan`.
        write: False = the memory-off control: no segment writes, each reads ``M``, ``z`` as given.

    Returns:
        A [b, h, n, v] (or 2v, see :func:`gate_mix`; the wider of q's dtype and fp32), and the
        memory ``M``, ``z`` after the complete segments.

    Reference: arXiv 2404.07143, section 2.1 (all of it, segment-batched).
    """
    n, S = q.shape[2], segment_len
    g, r = divmod(n, S)
    outs = []
    if g:
        qs, ks, vs = (rearrange(t[:, :, : g * S], "b h (g s) k -> b h g s k", s=S) for t in (q, k, v))
        if write:
            bs, gs = (None if t is None else rearrange(t[:, :, : g * S], "b h (g s) -> b h g s", s=S) for t in (strength, decay))
            M_read, z_read, M, z = memory_scan(ks, vs, M, z, rule, bs, decay=gs, detach_every=detach_every, segments_done=segments_done)
        else:
            M_read, z_read = M[:, :, None].expand(-1, -1, g, -1, -1), z[:, :, None].expand(-1, -1, g, -1)
        a_mem = memory_read(qs, M_read, z_read, rule)  # [b, h, g, s, v]
        fold = "b h g s k -> (b g) h s k"
        a_dot = local_attention(rearrange(qs, fold), rearrange(ks, fold), rearrange(vs, fold), rope_theta=rope_theta)
        a_dot = rearrange(a_dot, "(b g) h s v -> b h g s v", g=g)
        outs.append(rearrange(gate_mix(a_mem, a_dot, beta), "b h g s v -> b h (g s) v"))
    if r:
        qt, kt, vt = (t[:, :, g * S :] for t in (q, k, v))
        outs.append(gate_mix(memory_read(qt, M, z, rule), local_attention(qt, kt, vt, rope_theta=rope_theta), beta))
    return torch.cat(outs, dim=2), M, z


def infini_attention_naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    M: Tensor,
    z: Tensor,
    beta: Tensor | None,
    *,
    segment_len: int,
    rule: MemoryRule = PAPER,
    strength: Tensor | None = None,
    decay: Tensor | None = None,
    rope_theta: float = 10000.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference form of :func:`infini_attention`: segment by segment, query by query, token-sum by token-sum.

    Nothing is batched over time and no helper of the fast form is used for the maths (only RoPE
    and the feature map): for each query, an explicit causal softmax over the segment's earlier
    keys and an explicit memory read; after each complete segment, the update summed one token at
    a time (the paper's rules: every term from the memory of the segment's start), or applied one
    token at a time (DeltaNet: each from the memory the previous token left; no triangular solve).

    Args and returns: as :func:`infini_attention` (no truncation options: reference only); with a
    ``decay`` the memory is multiplied by ``exp(decay_t)`` before token t reads and writes it.

    Reference: arXiv 2404.07143, sections 2.1.1 and 2.1.2, as written; DeltaNet's recurrence
    (arXiv 2406.06484, eq. 1).
    """
    n, dk = q.shape[2], q.shape[3]
    dtype = _memory_dtype(M)
    M, z = M.to(dtype), z.to(dtype)
    gate = None if beta is None else beta.to(dtype).sigmoid()[None, :, None]  # [1, h, 1]
    b = torch.ones(q.shape[:3], dtype=dtype) if strength is None else strength.to(dtype)  # [b, h, n]
    alpha = torch.ones(q.shape[:3], dtype=dtype) if decay is None else decay.to(dtype).exp()  # [b, h, n]

    def read(f: Tensor, M: Tensor, z: Tensor) -> Tensor:  # f [b, h, k] -> [b, h, v]
        num = einsum(f, M, "b h k, b h k v -> b h v")
        return num / einsum(f, z, "b h k, b h k -> b h").clamp_min(EPS)[..., None] if rule.normalize else num

    outs = []
    for start in range(0, n, segment_len):
        end = min(start + segment_len, n)
        pos = torch.arange(end - start, device=q.device)
        qr, kr = apply_rope(q[:, :, start:end], pos, rope_theta), apply_rope(k[:, :, start:end], pos, rope_theta)
        for i in range(end - start):
            # A_dot: softmax(q_i K_{<=i}^T / sqrt(k)) V_{<=i}, within the segment
            scores = einsum(qr[:, :, i].to(dtype), kr[:, :, : i + 1].to(dtype), "b h k, b h j k -> b h j") / math.sqrt(dk)
            a_dot = einsum(scores.softmax(dim=-1), v[:, :, start : start + i + 1].to(dtype), "b h j, b h j v -> b h v")
            # A_mem: phi(q_i) M_{s-1} / (phi(q_i) z_{s-1}), the memory of the segment's start
            a_mem = read(features(q[:, :, start + i].to(dtype), rule.feature_map), M, z)
            outs.append(torch.cat([a_dot, a_mem], dim=-1) if gate is None else gate * a_mem + (1 - gate) * a_dot)
        if end - start == segment_len and rule.update_rule == "deltanet":  # token by token, each write seeing the one before
            dz = torch.zeros_like(z)
            for t in range(start, end):
                fk = features(k[:, :, t].to(dtype), rule.feature_map)  # [b, h, k]
                M = alpha[:, :, t, None, None] * M  # Gated DeltaNet's decay (1 without it)
                new = v[:, :, t].to(dtype) - read(fk, M, z)  # what the decayed memory does not return for k_t
                M = M + einsum(fk, b[:, :, t, None] * new, "b h k, b h v -> b h k v")
                dz = dz + b[:, :, t, None] * fk
            z = z + dz
        elif end - start == segment_len:  # a complete segment is written, one token's term at a time
            dM, dz = torch.zeros_like(M), torch.zeros_like(z)
            for t in range(start, end):
                fk = features(k[:, :, t].to(dtype), rule.feature_map)  # [b, h, k]
                bt = b[:, :, t, None]
                new = v[:, :, t].to(dtype)
                if rule.update_rule == "delta":  # subtract what the memory of the segment's start already returns for k_t
                    new = new - read(fk, M, z)
                dM = dM + einsum(fk, bt * new, "b h k, b h v -> b h k v")
                dz = dz + bt * fk
            M, z = M + dM, z + dz
    return torch.stack(outs, dim=2), M, z
