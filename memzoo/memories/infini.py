"""Infini-attention: local softmax attention plus a compressive linear memory per head.

``infini`` (delta rule) and ``infini-linear`` (linear rule) are the paper's; ``infini-deltanet``
keeps its segments and local attention and gives the memory what the linear-RNN literature shows
makes such a memory retrieve (unit keys, DeltaNet's token-by-token delta rule without a growing
normaliser, a per-token write strength, a short causal conv on q/k/v, and a zero-initialised
memory output instead of the gate: see :class:`InfiniConfig`). Q/K/V are shared by the two paths:
inside each segment of ``segment_len`` stream tokens, causal softmax attention with RoPE on
segment-local positions; across segments, a per-head associative matrix ``M`` [k, v] and
normaliser ``z`` [k] read with ``s(Q) M / (s(Q) z)`` (``s = ELU + 1``, no positions); a learned
gate per head mixes the two. The maths lives in :mod:`memzoo.ops.infini`.

Split invariance (why a token's output does not depend on how the stream is cut into calls): the
state counts stream positions and keeps the unfinished segment's keys and values in a buffer of
fixed capacity ``segment_len``. A token of an unfinished segment attends causally to the earlier
tokens of its segment (from the buffer) and reads the memory as it was at the segment's start;
the memory is written when the segment completes, whichever call completes it. Positions never
exceed ``segment_len - 1`` (segment-local RoPE; the memory path has none), so a model trained on
a few segments runs on any length.

Gradients flow through the memory across segments (and across calls, until the caller detaches
the state); ``detach_every`` cuts them inside a call every k segments.

Optimiser knobs of the gate: the module exposes ``optim_overrides`` (read by
:func:`memzoo.training.param_groups.param_groups`), by default ``{"beta": {"lr_mult": 10.0,
"weight_decay": 0.0}}``: reproductions whose gates never left sigmoid(0) = 0.5 trained them like
every other weight; a 10x learning rate and no decay let an early prototype learn passkey.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..interface import MemoryConfig, MemoryModule, MemoryState
from ..ops.conv import causal_conv, check_kernel, identity_plus
from ..ops.infini import FEATURE_MAPS, UPDATE_RULES, MemoryRule, gate_mix, infini_attention, local_attention, memory_read, memory_write
from ..registry import register
from ..validation import bounds

__all__ = ["InfiniConfig", "InfiniState", "InfiniAttention", "UPDATE_RULES", "FEATURE_MAPS", "MIXES"]

#: how the memory read joins local attention: the paper's gate, or added through its own projection
MIXES = ("gate", "add")


# ---------------------------------------------------------------------------------- config
@dataclass
class InfiniConfig(MemoryConfig):
    """Infini-attention's knobs (defaults: the paper's method at CPU scale, an early prototype's gate recipe).

    The first six are the paper's design; ``feature_map`` to ``mix`` are documented additions
    (off by default, all on in ``infini-deltanet``), so ``infini`` stays the paper as written.

    Attributes:
        segment_len: s, tokens per segment. The paper uses 2048; 256 keeps the local attention
            cheap on a CPU and is what an early prototype learned passkey with.
        update_rule: ``"delta"`` (paper's Linear + Delta: write only what the memory of the
            segment's start does not already return for a key), ``"linear"`` (M += s(K)^T V) or
            ``"deltanet"`` (the delta rule token by token, each write seeing the one before:
            DeltaNet's; needs ``feature_map="silu-l2"`` and ``normalize=False``).
        gate_init: initial beta of every head. 0 gives sigmoid(0) = 0.5, an even mix of memory
            and local attention, where sigmoid's slope (so the gradient reaching beta) is
            largest; an early prototype learned with it. A negative value starts local-first.
        gate_lr_mult: learning-rate multiplier of beta (via ``optim_overrides``). 10 because one
            scalar per head gets a small gradient at the base rate and stays near 0.5 (the
            failure of reproductions); 10x let the gates move in an early prototype.
        gate_weight_decay: weight decay of beta. 0: decay pulls beta to 0, i.e. the gate back
            to 0.5, which is exactly the failure to avoid.
        detach_every: cut the memory's autograd graph every this many segments of the stream
            (0 = never: back-propagation through the memory across all segments of a call and
            of the calls the caller did not detach). Outputs are unaffected.
        feature_map: the memory path's features of q and k: ``"elu+1"`` (the paper's, all
            positive, so every key overlaps every other) or ``"silu-l2"`` (SiLU then unit norm:
            DeltaNet's, keys that can be orthogonal).
        normalize: divide the read by ``s(q) z`` (the paper). ``z`` grows with every token, so a
            fact written once fades as ~1/T; ``"silu-l2"`` needs false (its ``s(q) z`` can be 0).
        write_strength: a per-token write strength ``b_t = sigmoid(w_h . x_t + c_h)`` per head
            (DeltaNet's beta; ARMT's write gate), so filler can be written weakly and a fact
            strongly. Off: every token writes with strength 1 (the paper).
        conv_kernel: taps of a causal depthwise conv on q, k and v after their projection (0:
            none, the paper). Initialised to the identity, so a warm start is unchanged.
        mix: ``"gate"`` (the paper's ``sigmoid(beta) A_mem + (1 - sigmoid(beta)) A_dot``) or
            ``"add"``: ``W_O A_dot + W_mem A_mem`` with ``W_mem`` initialised to 0, so a model
            warm-started from a softmax backbone is exactly local attention until the memory
            earns its place (a gate at 0.5 halves the local path from the first step).
        decay: Gated DeltaNet's per-token decay of the memory (``update_rule="deltanet"`` only):
            ``M_t = alpha_t M_{t-1} + b_t phi(k_t)^T (v_t - alpha_t phi(k_t) M_{t-1})`` with
            ``alpha_t = exp(-softplus(w_h . x_t + c_h))`` per head, so the residue of filler can
            fade while ``alpha_t`` stays at 1 over what must be kept. Off: ``alpha_t = 1``.
        decay_init: ``1 - alpha`` at initialisation (``w_h = 0``, ``c_h`` set from it): 1e-5 per
            token keeps 85% of a write over 16K tokens, so a warm start from a model without the
            decay begins almost unchanged and learns where to forget.
    """

    segment_len: int = field(default=256, metadata=bounds(ge=1))
    update_rule: str = field(default="delta", metadata=bounds(choices=UPDATE_RULES))
    gate_init: float = 0.0
    gate_lr_mult: float = field(default=10.0, metadata=bounds(ge=0))
    gate_weight_decay: float = field(default=0.0, metadata=bounds(ge=0))
    detach_every: int = field(default=0, metadata=bounds(ge=0))
    feature_map: str = field(default="elu+1", metadata=bounds(choices=FEATURE_MAPS))
    normalize: bool = True
    write_strength: bool = False
    conv_kernel: int = field(default=0, metadata=bounds(ge=0))
    mix: str = field(default="gate", metadata=bounds(choices=MIXES))
    decay: bool = False
    decay_init: float = field(default=1e-5, metadata=bounds(gt=0, lt=1))

    def __post_init__(self):
        super().__post_init__()
        _ = self.rule  # MemoryRule checks the combination and says what to change
        check_kernel("conv_kernel", self.conv_kernel)
        if self.decay and self.update_rule != "deltanet":
            raise ValueError(
                f"decay is Gated DeltaNet's, a decay of the delta rule's memory token by token: set update_rule to 'deltanet' "
                f"(with feature_map 'silu-l2' and normalize false), or decay to false; got update_rule={self.update_rule!r}"
            )

    @property
    def rule(self) -> MemoryRule:
        """The memory's update rule, feature map and normaliser, for :mod:`memzoo.ops.infini`."""
        return MemoryRule(update_rule=self.update_rule, feature_map=self.feature_map, normalize=self.normalize)

    def build_module(self, backbone, layer_idx: int) -> InfiniAttention:
        return InfiniAttention(backbone.d_model, backbone.n_heads, self, rope_theta=backbone.rope_theta)


@register("infini")
def infini() -> InfiniConfig:
    return InfiniConfig(update_rule="delta")


@register("infini-linear")
def infini_linear() -> InfiniConfig:
    return InfiniConfig(update_rule="linear")


@register("infini-deltanet")
def infini_deltanet() -> InfiniConfig:
    """Infini's segments and local attention with a memory that retrieves (DeltaNet, Gated DeltaNet, ARMT)."""
    return InfiniConfig(
        update_rule="deltanet", feature_map="silu-l2", normalize=False, write_strength=True, conv_kernel=4, mix="add"
    )


# ---------------------------------------------------------------------------------- state
@dataclass
class InfiniState(MemoryState):
    """One layer's Infini-attention state.

    ``nbytes() = b*h*(k*v + k)*m + b*h*s*(k + v)*e``, where ``m`` is the memory's itemsize (4:
    fp32, or 8 for fp64) and ``e`` the buffer's (the state dtype's, 4 by default). With the
    defaults (fp32, k = v) that is ``4*b*h*k*(k + 1 + 2*s)`` bytes per layer, whatever the length
    of the stream. ``write_strength`` adds ``b*h*s*e`` (the buffered strengths), ``decay``
    ``b*h*s*m`` (the buffered log decays) and ``conv_kernel`` ``b*(conv_kernel - 1)*3d*e`` (the
    conv's left context).

    Attributes:
        M: [b, h, k, v] memory, fp32 (fp64 if the state is fp64), even under bf16 autocast.
        z: [b, h, k] normaliser (sum of s(K) over written tokens, weighted by their strengths),
            same dtype as M; kept but not read when ``normalize`` is false.
        keys: [b, h, s, k] un-rotated keys of the unfinished segment, slots [0, fill).
        values: [b, h, s, v] its values.
        position: stream tokens seen so far.
        strengths: [b, h, s] the unfinished segment's write strengths (``write_strength`` only).
        decays: [b, h, s] the unfinished segment's log decays, in M's dtype (``decay`` only).
        conv: [b, conv_kernel - 1, 3d] the last q/k/v projections before the conv (``conv_kernel`` only).
    """

    M: Tensor
    z: Tensor
    keys: Tensor
    values: Tensor
    position: int = 0
    strengths: Tensor | None = None
    conv: Tensor | None = None
    decays: Tensor | None = None

    @property
    def fill(self) -> int:
        """Tokens of the unfinished segment held in the buffer."""
        return self.position % self.keys.shape[2]


# ---------------------------------------------------------------------------------- module
class InfiniAttention(MemoryModule):
    """Multi-head Infini-attention (local softmax attention + compressive memory, gated per head).

    Args:
        d_model: d.
        n_heads: h (head dim k = v = d / h).
        config: :class:`InfiniConfig`.
        rope_theta: RoPE base of the local attention.

    Attributes:
        beta: [h] gate logits; ``sigmoid(beta)`` is the weight of the memory read (``mix="gate"``).
        mem_out: ``Linear(d -> d)``, zero at init, the memory read's projection (``mix="add"``).
        strength: ``Linear(d -> h)``, the per-token write strengths' logits (``write_strength``).
        decay: ``Linear(d -> h)``, the per-token decays' pre-activations (``decay``): ``alpha = exp(-softplus(.))``.
        conv: [3d, conv_kernel] the depthwise conv's taps minus the identity (the last tap, the
            token itself, is ``1 + conv[:, -1]``), zero at init (``conv_kernel``).
        optim_overrides: ``{"beta": {"lr_mult": ..., "weight_decay": ...}}`` from the config, for
            :func:`memzoo.training.param_groups.param_groups`.

    Reference: Munkhdalai et al., "Leave No Context Behind" (arXiv 2404.07143), section 2.1;
    DeltaNet (arXiv 2406.06484) for the additions.
    """

    def __init__(self, d_model: int, n_heads: int, config: InfiniConfig, rope_theta: float = 10000.0):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.config = config
        self.rule = config.rule
        self.segment_len = config.segment_len
        self.rope_theta = rope_theta
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.beta = nn.Parameter(torch.empty(n_heads)) if config.mix == "gate" else None
        self.mem_out = nn.Linear(d_model, d_model, bias=False) if config.mix == "add" else None
        self.strength = nn.Linear(d_model, n_heads) if config.write_strength else None
        self.decay = nn.Linear(d_model, n_heads) if config.decay else None
        self.conv = nn.Parameter(torch.empty(3 * d_model, config.conv_kernel)) if config.conv_kernel else None
        self.optim_overrides = {}
        if self.beta is not None:
            self.optim_overrides["beta"] = {"lr_mult": config.gate_lr_mult, "weight_decay": config.gate_weight_decay}
        self.reset_memory_parameters()

    @property
    def memory_off_means(self) -> str:
        return "the compressive memory is never written: every segment reads an empty memory (local attention unchanged)"

    def reset_memory_parameters(self) -> None:
        """The gate at ``gate_init``, the memory output at 0, the conv at the identity (its offset at 0),
        the decay at ``decay_init`` for every token."""
        if self.beta is not None:
            nn.init.constant_(self.beta, self.config.gate_init)
        if self.mem_out is not None:
            nn.init.zeros_(self.mem_out.weight)
        if self.conv is not None:
            nn.init.zeros_(self.conv)
        if self.decay is not None:  # 1 - exp(-softplus(c)) = decay_init
            nn.init.zeros_(self.decay.weight)
            nn.init.constant_(self.decay.bias, math.log(math.expm1(-math.log1p(-self.config.decay_init))))

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> InfiniState:
        device = self._default_device(device)
        dtype = dtype or self.qkv.weight.dtype
        mem_dtype = torch.promote_types(dtype, torch.float32)  # memory maths never below fp32
        b, h, k, s = batch_size, self.n_heads, self.head_dim, self.segment_len

        def zeros(*shape, dt=dtype):
            return torch.zeros(*shape, device=device, dtype=dt)

        return InfiniState(
            M=zeros(b, h, k, k, dt=mem_dtype),
            z=zeros(b, h, k, dt=mem_dtype),
            keys=zeros(b, h, s, k),
            values=zeros(b, h, s, k),
            strengths=zeros(b, h, s) if self.strength is not None else None,
            conv=zeros(b, self.config.conv_kernel - 1, 3 * h * k) if self.conv is not None else None,
            decays=zeros(b, h, s, dt=mem_dtype) if self.decay is not None else None,
        )

    def _project(self, x: Tensor, state: InfiniState) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """q, k, v [b, h, n, k], write strengths [b, h, n] (or None), the conv's next context and log decays [b, h, n] (or None)."""
        p, conv = self.qkv(x), None
        if self.conv is not None:
            p, conv = causal_conv(p, state.conv, identity_plus(self.conv))
        q, k, v = rearrange(p, "b n (three h k) -> three b h n k", three=3, h=self.n_heads)
        strength = decay = None
        if self.strength is not None:
            strength = rearrange(torch.sigmoid(self.strength(x)), "b n h -> b h n")
        if self.decay is not None:  # log alpha = -softplus(.), at least fp32: a decay of 1e-5 needs the mantissa
            decay = rearrange(-F.softplus(self.decay(x).to(torch.promote_types(x.dtype, torch.float32))), "b n h -> b h n")
        return q, k, v, strength, conv, decay

    def forward(self, x: Tensor, state: InfiniState) -> tuple[Tensor, InfiniState]:
        q, k, v, strength, conv, decay = self._project(x, state)
        n, S, rule = x.shape[1], self.segment_len, self.rule
        M, z, keys, values, strengths, pos = state.M, state.z, state.keys, state.values, state.strengths, state.position
        decays = state.decays
        outs, i = [], 0
        if pos % S:  # finish the unfinished segment first: its earlier tokens are in the buffer
            f = pos % S
            i = min(n, S - f)
            # out-of-place writes: the caller's state stays valid (and autograd sees no in-place op)
            keys = keys.slice_scatter(k[:, :, :i].to(keys.dtype), dim=2, start=f, end=f + i)
            values = values.slice_scatter(v[:, :, :i].to(values.dtype), dim=2, start=f, end=f + i)
            if strengths is not None:
                strengths = strengths.slice_scatter(strength[:, :, :i].to(strengths.dtype), dim=2, start=f, end=f + i)
            if decays is not None:
                decays = decays.slice_scatter(decay[:, :, :i].to(decays.dtype), dim=2, start=f, end=f + i)
            a_dot = local_attention(q[:, :, :i], keys[:, :, : f + i].to(q.dtype), values[:, :, : f + i], rope_theta=self.rope_theta)
            outs.append(gate_mix(memory_read(q[:, :, :i], M, z, rule), a_dot, self.beta))
            pos += i
            if pos % S == 0 and not self.memory_off:
                M, z = memory_write(keys, values, M, z, rule, strengths, decays)
                M, z = self._maybe_detach(M, z, pos // S)
        if i < n:  # the rest starts at a segment boundary: batched over its complete segments
            a, M, z = infini_attention(
                q[:, :, i:],
                k[:, :, i:],
                v[:, :, i:],
                M,
                z,
                self.beta,
                segment_len=S,
                rule=rule,
                strength=None if strength is None else strength[:, :, i:],
                decay=None if decay is None else decay[:, :, i:],
                rope_theta=self.rope_theta,
                detach_every=self.config.detach_every,
                segments_done=pos // S,
                write=not self.memory_off,
            )
            outs.append(a)
            pos += n - i
            tail = pos % S
            if tail:  # keep the new unfinished segment for the next call
                keys = keys.slice_scatter(k[:, :, n - tail :].to(keys.dtype), dim=2, start=0, end=tail)
                values = values.slice_scatter(v[:, :, n - tail :].to(values.dtype), dim=2, start=0, end=tail)
                if strengths is not None:
                    strengths = strengths.slice_scatter(strength[:, :, n - tail :].to(strengths.dtype), dim=2, start=0, end=tail)
                if decays is not None:
                    decays = decays.slice_scatter(decay[:, :, n - tail :].to(decays.dtype), dim=2, start=0, end=tail)
        a = torch.cat(outs, dim=2).to(x.dtype)
        if self.mem_out is None:
            y = self.out(rearrange(a, "b h n v -> b n (h v)"))
        else:  # [A_dot | A_mem] per head: each through its own projection
            a_dot, a_mem = a.chunk(2, dim=-1)
            y = self.out(rearrange(a_dot, "b h n v -> b n (h v)")) + self.mem_out(rearrange(a_mem, "b h n v -> b n (h v)"))
        if conv is not None:
            conv = conv.to(state.conv.dtype)
        new = InfiniState(M=M, z=z, keys=keys, values=values, position=pos, strengths=strengths, conv=conv, decays=decays)
        return y, new

    def _maybe_detach(self, M: Tensor, z: Tensor, segments_done: int) -> tuple[Tensor, Tensor]:
        every = self.config.detach_every
        if every > 0 and segments_done % every == 0:
            return M.detach(), z.detach()
        return M, z
