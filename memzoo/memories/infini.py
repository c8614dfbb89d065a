"""Infini-attention: local softmax attention plus a compressive linear memory per head.

``infini`` (delta rule) and ``infini-linear`` (linear rule). Q/K/V are shared by the two paths:
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

from dataclasses import dataclass, field

import torch
from einops import rearrange
from torch import Tensor, nn

from ..interface import MemoryConfig, MemoryModule, MemoryState
from ..ops.infini import gate_mix, infini_attention, local_attention, memory_read, memory_write
from ..registry import register
from ..validation import bounds

__all__ = ["InfiniConfig", "InfiniState", "InfiniAttention", "UPDATE_RULES"]

UPDATE_RULES = ("delta", "linear")


# ---------------------------------------------------------------------------------- config
@dataclass
class InfiniConfig(MemoryConfig):
    """Infini-attention's knobs (defaults: the paper's method at CPU scale, an early prototype's gate recipe).

    Attributes:
        segment_len: s, tokens per segment. The paper uses 2048; 256 keeps the local attention
            cheap on a CPU and is what an early prototype learned passkey with.
        update_rule: ``"delta"`` (paper's Linear + Delta: write only what the memory does not
            already return for a key) or ``"linear"`` (M += s(K)^T V).
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
    """

    segment_len: int = field(default=256, metadata=bounds(ge=1))
    update_rule: str = field(default="delta", metadata=bounds(choices=UPDATE_RULES))
    gate_init: float = 0.0
    gate_lr_mult: float = field(default=10.0, metadata=bounds(ge=0))
    gate_weight_decay: float = field(default=0.0, metadata=bounds(ge=0))
    detach_every: int = field(default=0, metadata=bounds(ge=0))

    def build_module(self, backbone, layer_idx: int) -> InfiniAttention:
        return InfiniAttention(backbone.d_model, backbone.n_heads, self, rope_theta=backbone.rope_theta)


@register("infini")
def infini() -> InfiniConfig:
    return InfiniConfig(update_rule="delta")


@register("infini-linear")
def infini_linear() -> InfiniConfig:
    return InfiniConfig(update_rule="linear")


# ---------------------------------------------------------------------------------- state
@dataclass
class InfiniState(MemoryState):
    """One layer's Infini-attention state.

    ``nbytes() = b*h*(k*v + k)*m + b*h*s*(k + v)*e``, where ``m`` is the memory's itemsize (4:
    fp32, or 8 for fp64) and ``e`` the buffer's (the state dtype's, 4 by default). With the
    defaults (fp32, k = v) that is ``4*b*h*k*(k + 1 + 2*s)`` bytes per layer, whatever the length
    of the stream.

    Attributes:
        M: [b, h, k, v] memory, fp32 (fp64 if the state is fp64), even under bf16 autocast.
        z: [b, h, k] normaliser (sum of s(K) over written tokens), same dtype as M.
        keys: [b, h, s, k] un-rotated keys of the unfinished segment, slots [0, fill).
        values: [b, h, s, v] its values.
        position: stream tokens seen so far.
    """

    M: Tensor
    z: Tensor
    keys: Tensor
    values: Tensor
    position: int = 0

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
        beta: [h] gate logits; ``sigmoid(beta)`` is the weight of the memory read.
        optim_overrides: ``{"beta": {"lr_mult": ..., "weight_decay": ...}}`` from the config, for
            :func:`memzoo.training.param_groups.param_groups`.

    Reference: Munkhdalai et al., "Leave No Context Behind" (arXiv 2404.07143), section 2.1.
    """

    def __init__(self, d_model: int, n_heads: int, config: InfiniConfig, rope_theta: float = 10000.0):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.config = config
        self.segment_len = config.segment_len
        self.delta = config.update_rule == "delta"
        self.rope_theta = rope_theta
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.beta = nn.Parameter(torch.full((n_heads,), float(config.gate_init)))
        self.optim_overrides = {"beta": {"lr_mult": config.gate_lr_mult, "weight_decay": config.gate_weight_decay}}

    @property
    def memory_off_means(self) -> str:
        return "the compressive memory is never written: every segment reads an empty memory (local attention unchanged)"

    def reset_memory_parameters(self) -> None:
        nn.init.constant_(self.beta, self.config.gate_init)

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> InfiniState:
        device = self._default_device(device)
        dtype = dtype or self.qkv.weight.dtype
        mem_dtype = torch.promote_types(dtype, torch.float32)  # memory maths never below fp32
        b, h, k, s = batch_size, self.n_heads, self.head_dim, self.segment_len
        return InfiniState(
            M=torch.zeros(b, h, k, k, device=device, dtype=mem_dtype),
            z=torch.zeros(b, h, k, device=device, dtype=mem_dtype),
            keys=torch.zeros(b, h, s, k, device=device, dtype=dtype),
            values=torch.zeros(b, h, s, k, device=device, dtype=dtype),
        )

    def forward(self, x: Tensor, state: InfiniState) -> tuple[Tensor, InfiniState]:
        q, k, v = rearrange(self.qkv(x), "b n (three h k) -> three b h n k", three=3, h=self.n_heads)
        n, S = x.shape[1], self.segment_len
        M, z, keys, values, pos = state.M, state.z, state.keys, state.values, state.position
        outs, i = [], 0
        if pos % S:  # finish the unfinished segment first: its earlier tokens are in the buffer
            f = pos % S
            i = min(n, S - f)
            # out-of-place writes: the caller's state stays valid (and autograd sees no in-place op)
            keys = keys.slice_scatter(k[:, :, :i].to(keys.dtype), dim=2, start=f, end=f + i)
            values = values.slice_scatter(v[:, :, :i].to(values.dtype), dim=2, start=f, end=f + i)
            a_dot = local_attention(q[:, :, :i], keys[:, :, : f + i].to(q.dtype), values[:, :, : f + i], rope_theta=self.rope_theta)
            outs.append(gate_mix(memory_read(q[:, :, :i], M, z), a_dot, self.beta))
            pos += i
            if pos % S == 0 and not self.memory_off:
                M, z = memory_write(keys, values, M, z, delta=self.delta)
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
                delta=self.delta,
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
        y = rearrange(torch.cat(outs, dim=2).to(x.dtype), "b h n v -> b n (h v)")
        return self.out(y), InfiniState(M=M, z=z, keys=keys, values=values, position=pos)

    def _maybe_detach(self, M: Tensor, z: Tensor, segments_done: int) -> tuple[Tensor, Tensor]:
        every = self.config.detach_every
        if every > 0 and segments_done % every == 0:
            return M.detach(), z.detach()
        return M, z
