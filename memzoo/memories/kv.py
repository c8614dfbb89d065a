"""KV-cache eviction: softmax attention over a bounded cache, and the policies that choose it.

``CachedAttention`` is the shared machinery: the queries of each piece attend over
``[cache | piece]``, the piece's keys/values join the cache, and every ``evict_every`` stream
tokens an :class:`EvictionPolicy` scores the cached tokens and the best ``budget`` stay. A policy
implements one method, :meth:`EvictionPolicy.score`; the module does the rest.

Positions (why a model trained on 4K tokens never sees an unknown position at 1M): keys are
cached *un-rotated*, and RoPE is applied at attention time with **slot positions**, as
StreamingLLM does: a cached token's position is its slot index in the cache, and a new token's is
the next free slot. Eviction compacts the cache (kept tokens keep their order), so positions never
exceed ``budget + evict_every``. Without eviction (``full``) slots are stream positions.
Streaming (no autograd), each key's rotation is kept beside it and computed once per eviction
period, not at every call; an eviction, which moves keys, drops them.

Writes (why a short call does not copy the cache): states are values, the caller's is never
modified, yet a stream's newest state takes its next tokens in place, into slots no state has
claimed (see :class:`_Frontier`); only an older state continued a second time copies.

Eviction rhythm (why outputs do not depend on how the stream is cut into calls): eviction happens
when the stream position reaches a multiple of ``evict_every``, never at call boundaries. A call
that crosses such a boundary is processed in pieces cut there. Between evictions the cache grows
by up to ``evict_every`` tokens, so its buffers are allocated once at ``budget + evict_every``
slots: ``state.nbytes()`` is constant for the whole stream.

The slot maths (:func:`append`, :func:`evict`, :func:`select_slots`) are plain functions of a
:class:`KVCacheState`, so that ``memzoo.hf.EvictingCache`` runs the very same policies on the cache of
any transformers model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
from einops import rearrange
from torch import Tensor, nn

from ..interface import MemoryConfig, MemoryModule, MemoryState
from ..ops.attention import attend
from ..ops.conv import causal_conv, check_kernel, identity_plus
from ..ops.rope import apply_rope
from ..registry import register
from ..validation import bounds

__all__ = [
    "KVConfig",
    "KVCacheState",
    "CachedAttention",
    "EvictionPolicy",
    "KeepAll",
    "RecentTokens",
    "SinksAndRecent",
    "FullConfig",
    "WindowConfig",
    "SinksConfig",
    "RecentWindowConfig",
    "append",
    "evict",
    "protect_recent",
    "select_slots",
    "gather_slots",
]


# ---------------------------------------------------------------------------------- state
class _Frontier:
    """The newest writer of a set of cache buffers: its ``keys`` storage and the slots written so far.

    States are values (state in, state out; the caller's state is never modified), yet copying the
    whole buffer for every few tokens is most of a short call's time. Both hold because of one
    rule: slots ``[0, length)`` of a state are never written in place. Only the state whose
    ``length`` equals the buffers' highest written slot (``end``) may write the slots after it, in
    place; any other state (an older one continued a second time, a detached or expanded copy)
    copies first. So an older state sharing the buffers may find slots past its own ``length``
    overwritten (nothing reads them), never the slots before it.
    """

    __slots__ = ("ptr", "end")

    def __init__(self, keys: Tensor, end: int):
        self.ptr, self.end = keys.data_ptr(), end


@dataclass
class KVCacheState(MemoryState):
    """A bounded KV cache (one layer).

    Attributes:
        keys: [b, h, C, k] un-rotated keys; C is the capacity (``budget + evict_every``).
        values: [b, h, C, v].
        valid: [b, h, C] bool, True where a slot holds a kept token (policies may keep different
            numbers of tokens per head, leaving holes that attention masks out).
        token_pos: [b, h, C] long, stream position of the token in each slot (-1 if empty).
        length: slots in use: ``[0, length)``; the next token is written at slot ``length``.
        position: stream tokens seen so far.
        policy: the policy's own state, or None. Its tensor fields shaped [b, h, C, ...] are
            per-slot and are compacted together with the cache at each eviction.
        conv: [b, conv_kernel - 1, 3d] the last q/k/v projections before the short conv
            (``conv_kernel`` only; None otherwise).
        rotated: [b, h, C, k] the keys rotated at their slot positions, in the dtype attention last
            used, valid for slots ``[0, n_rotated)`` (None: nothing rotated yet). A cache of
            :class:`CachedAttention`'s streaming (no-gradient) path, so that each key is rotated
            once per eviction period rather than at every call; an eviction moves keys and drops it.
        n_rotated: slots of ``rotated`` that hold their key's rotation.
        frontier: the buffers' newest writer (see :func:`append`); not a tensor, never saved.
    """

    keys: Tensor
    values: Tensor
    valid: Tensor
    token_pos: Tensor
    length: int = 0
    position: int = 0
    policy: MemoryState | None = None
    conv: Tensor | None = None
    rotated: Tensor | None = None
    n_rotated: int = 0
    frontier: _Frontier | None = field(default=None, repr=False, compare=False)

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]


# ---------------------------------------------------------------------------------- policies
class EvictionPolicy(nn.Module):
    """What to keep. Subclasses implement :meth:`score`; everything else has a default.

    A policy is an ``nn.Module`` so that learned policies (NAMM) save their parameters with the
    model. Checklist for a new policy: subclass, implement ``score``; if it needs the attention
    each token receives, set ``needs_attention = True`` and implement ``init_state`` / ``observe``
    (per-slot tensors shaped [b, h, C, ...] are compacted for you, and cleared in slots that
    eviction frees; other tensors must not have that shape); if its state needs work once per eviction (NAMM's STFT step), implement
    ``before_eviction``; add a ``KVConfig`` subclass whose ``make_policy`` returns it, and
    ``@register`` a builder. The conformance suite then checks it.
    """

    #: ask CachedAttention for attention probabilities and call :meth:`observe` with them
    needs_attention: bool = False

    def score(self, cache: KVCacheState) -> Tensor:
        """Scores of the cached tokens, higher = keep.

        Args:
            cache: the cache right before eviction (its slots ``[0, cache.length)`` matter).

        Returns:
            [b, h, cache.length] float. ``-inf`` means evict even if the budget has room; the
            module keeps the ``budget`` best (ties go to the more recent token) and always keeps
            the newest token.
        """
        raise NotImplementedError

    def before_eviction(self, cache: KVCacheState) -> MemoryState | None:
        """Update the policy state right before :meth:`score`, at an eviction boundary.

        Work that should happen once per eviction period rather than once per attention call goes
        here (NAMM turns the attention columns recorded by :meth:`observe` into features).

        Args:
            cache: the cache right before eviction (``cache.position`` is the boundary).

        Returns:
            the new policy state (default: unchanged).
        """
        return cache.policy

    def init_state(self, batch_size: int, n_heads: int, capacity: int, device) -> MemoryState | None:
        """The policy's state for a new stream (None if it needs none)."""
        return None

    def observe(self, cache: KVCacheState, probs: Tensor, n_new: int) -> MemoryState | None:
        """Update the policy state after one attention call (only if ``needs_attention``).

        Args:
            cache: the cache including the ``n_new`` tokens just written (slots
                ``[cache.length - n_new, cache.length)``).
            probs: [b, h, n_new, cache.length] attention probabilities of the new queries.

        Returns:
            the new policy state.
        """
        return cache.policy


class KeepAll(EvictionPolicy):
    """``full``: never evict."""

    def score(self, cache: KVCacheState) -> Tensor:
        return torch.zeros(cache.valid[..., : cache.length].shape, device=cache.keys.device)


class RecentTokens(EvictionPolicy):
    """``window``: keep the most recent tokens."""

    def score(self, cache: KVCacheState) -> Tensor:
        return cache.token_pos[..., : cache.length].float()


_RECENT = RecentTokens()  # the memory-off control of every eviction policy


class SinksAndRecent(EvictionPolicy):
    """``sinks``: the first ``n_sinks`` tokens of the stream plus the most recent (StreamingLLM)."""

    def __init__(self, n_sinks: int = 4):
        super().__init__()
        self.n_sinks = n_sinks

    def score(self, cache: KVCacheState) -> Tensor:
        pos = cache.token_pos[..., : cache.length].float()
        return pos.masked_fill(pos < self.n_sinks, float("inf"))


def protect_recent(scores: Tensor, cache: KVCacheState, n_recent: int) -> Tensor:
    """Give the ``n_recent`` most recent stream tokens the score ``+inf`` (they always stay).

    Args:
        scores: [b, h, cache.length].
        cache: the cache being scored.
        n_recent: size of the protected window, in stream tokens.

    Returns:
        [b, h, cache.length].
    """
    recent = cache.token_pos[..., : cache.length] >= cache.position - n_recent
    return scores.masked_fill(recent, float("inf"))


# ---------------------------------------------------------------------------------- slot maths
def select_slots(scores: Tensor, token_pos: Tensor, budget: int) -> tuple[Tensor, Tensor]:
    """Which slots stay: the ``budget`` highest scores, ties to the most recent, in slot order.

    Args:
        scores: [b, h, L] (``-inf`` = must go).
        token_pos: [b, h, L] stream positions (the tie-breaker).
        budget: slots to keep at most.

    Returns:
        idx [b, h, B] slot indices in increasing order (B = min(budget, L)), and keep [b, h, B]
        bool, False for the padding entries of heads that keep fewer than B tokens.
    """
    B = min(budget, scores.shape[-1])
    # recency first, then a stable sort by score: equal scores stay ordered most-recent-first
    by_recency = token_pos.argsort(dim=-1, descending=True, stable=True)
    ranked = by_recency.gather(-1, scores.gather(-1, by_recency).argsort(dim=-1, descending=True, stable=True))
    chosen = ranked[..., :B]  # [b, h, B]
    keep = scores.gather(-1, chosen) > float("-inf")
    L = scores.shape[-1]
    # put the dropped ones last, then restore slot (= temporal) order among the kept ones
    chosen_key = torch.where(keep, chosen, chosen + L)
    order = chosen_key.argsort(dim=-1)
    return chosen.gather(-1, order), keep.gather(-1, order)


def gather_slots(t: Tensor, idx: Tensor, capacity: int, keep: Tensor | None = None) -> Tensor:
    """Compact per-slot tensor ``t`` [b, h, C, ...] to the slots ``idx`` [b, h, B], padded to ``capacity``.

    Entries where ``keep`` [b, h, B] is False (heads that keep fewer than B tokens) and the padding
    are zeros (False for bool): a freed slot holds nothing of the token that left it.
    """
    extra = t.shape[3:]
    g = t.gather(2, idx.reshape(*idx.shape, *(1,) * len(extra)).expand(*idx.shape, *extra))
    if keep is not None:
        g = g.masked_fill(~keep.reshape(*keep.shape, *(1,) * len(extra)), 0)
    pad = t.new_zeros(*t.shape[:2], capacity - idx.shape[2], *extra)
    return torch.cat([g, pad], dim=2)


# ---------------------------------------------------------------------------------- config
@dataclass
class FullConfig(MemoryConfig):
    """``full``: softmax attention over a cache that never evicts (the reference; memory grows).

    Attributes:
        conv_kernel: taps of a short causal depthwise conv on q, k and v after their projection
            (0: none). Each token's key then carries its predecessors, which is what multi-token
            key matching (associative recall with keys of several bytes) needs and what a plain
            attention layer has to learn with a previous-token head first. Initialised to the
            identity, so a warm start from a model without it begins unchanged. The cache stores
            the conv's outputs; only ``kernel - 1`` projections are carried beside it.
    """

    conv_kernel: int = field(default=0, metadata=bounds(ge=0))

    def __post_init__(self):
        super().__post_init__()
        check_kernel("conv_kernel", self.conv_kernel)

    def make_policy(self) -> EvictionPolicy:
        return KeepAll()

    def build_module(self, backbone, layer_idx: int) -> CachedAttention:
        return CachedAttention(backbone.d_model, backbone.n_heads, self, rope_theta=backbone.rope_theta)


@dataclass
class KVConfig(FullConfig):
    """Softmax attention over a cache that an eviction policy keeps within ``budget`` tokens.

    Subclasses say which policy (``make_policy``) and add its knobs.

    Attributes:
        budget: tokens kept after each eviction.
        evict_every: eviction rhythm in stream tokens (NAMM's 512 by default); between two
            evictions the cache holds up to ``budget + evict_every`` tokens.
    """

    budget: int = field(default=1024, metadata=bounds(ge=1))  # for an unbounded cache, use 'full'
    evict_every: int = field(default=512, metadata=bounds(ge=1))

    def make_policy(self) -> EvictionPolicy:
        raise NotImplementedError


@dataclass
class WindowConfig(KVConfig):
    """``window``: keep the most recent ``budget`` tokens."""

    def make_policy(self) -> EvictionPolicy:
        return RecentTokens()


@dataclass
class SinksConfig(KVConfig):
    """``sinks``: keep the first ``n_sinks`` tokens and the most recent (StreamingLLM, arXiv 2309.17453)."""

    n_sinks: int = field(default=4, metadata=bounds(ge=0))

    def __post_init__(self):
        super().__post_init__()
        if not self.n_sinks < self.budget:
            raise ValueError(f"n_sinks must lie in [0, budget={self.budget}), got {self.n_sinks}")

    def make_policy(self) -> EvictionPolicy:
        return SinksAndRecent(self.n_sinks)


@dataclass
class RecentWindowConfig(KVConfig):
    """A policy that protects a recent window and scores the rest (``h2o``, ``l2``).

    Attributes:
        n_recent: tokens of the protected recent window; None = the subclass's default share of
            the budget (:meth:`recent`).
    """

    n_recent: int | None = field(default=None, metadata=bounds(ge=0))

    def __post_init__(self):
        super().__post_init__()
        if self.n_recent is not None and self.n_recent > self.budget:
            raise ValueError(f"n_recent must be an int in [0, budget={self.budget}], got {self.n_recent!r}")

    def recent(self, default: int) -> int:
        """``n_recent``, or ``default`` when it is None."""
        return default if self.n_recent is None else self.n_recent


@register("full")
def full() -> FullConfig:
    return FullConfig()


@register("window")
def window() -> WindowConfig:
    return WindowConfig()


@register("sinks")
def sinks() -> SinksConfig:
    return SinksConfig()


# ---------------------------------------------------------------------------------- module
class CachedAttention(MemoryModule):
    """Multi-head softmax attention over a KV cache managed by an eviction policy.

    Args:
        d_model: d.
        n_heads: h (head dim k = d / h).
        config: :class:`FullConfig` (no eviction) or a :class:`KVConfig` subclass (it makes the policy).
        rope_theta: RoPE base for slot positions.
    """

    def __init__(self, d_model: int, n_heads: int, config: FullConfig, rope_theta: float = 10000.0):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.config = config
        self.budget: int | None = getattr(config, "budget", None)  # None: never evict
        self.evict_every: int | None = getattr(config, "evict_every", None)
        self.rope_theta = rope_theta
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.conv = nn.Parameter(torch.zeros(3 * d_model, config.conv_kernel)) if config.conv_kernel else None
        self.policy = config.make_policy()

    def reset_memory_parameters(self) -> None:
        """The short conv at the identity (its learned offset at 0)."""
        if self.conv is not None:
            nn.init.zeros_(self.conv)

    @property
    def bounded(self) -> bool:
        return self.budget is not None

    @property
    def memory_off_means(self) -> str | None:
        if not self.bounded:
            return None  # full attention: every token stays, there is no memory beyond it to switch off
        return f"the cache keeps its most recent {self.budget} tokens (the window policy at the same budget)"

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> KVCacheState:
        device = self._default_device(device)
        dtype = dtype or self.qkv.weight.dtype
        b, h, k = batch_size, self.n_heads, self.head_dim
        C = self.budget + self.evict_every if self.bounded else 0
        return KVCacheState(
            keys=torch.zeros(b, h, C, k, device=device, dtype=dtype),
            values=torch.zeros(b, h, C, k, device=device, dtype=dtype),
            valid=torch.zeros(b, h, C, dtype=torch.bool, device=device),
            token_pos=torch.full((b, h, C), -1, dtype=torch.long, device=device),
            policy=self.policy.init_state(b, h, C, device),
            conv=torch.zeros(b, self.conv.shape[1] - 1, self.conv.shape[0], device=device, dtype=dtype) if self.conv is not None else None,
            rotated=torch.zeros(b, h, C, k, device=device, dtype=dtype),
        )

    def forward(self, x: Tensor, state: KVCacheState) -> tuple[Tensor, KVCacheState]:
        p = self.qkv(x)
        if self.conv is not None:
            p, conv = causal_conv(p, state.conv, identity_plus(self.conv))
            state = replace(state, conv=conv.to(state.conv.dtype))
        q, k, v = rearrange(p, "b n (three h k) -> three b h n k", three=3, h=self.n_heads)
        n, outs, start = x.shape[1], [], 0
        while start < n:
            # cut the call at the next eviction boundary of the stream
            room = self.evict_every - state.position % self.evict_every if self.bounded else n
            end = min(n, start + room)
            o, state = self._attend_piece(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], state)
            outs.append(o)
            if self.bounded and state.position % self.evict_every == 0:
                state = self._evict(state)
            start = end
        y = rearrange(torch.cat(outs, dim=2), "b h n k -> b n (h k)")
        return self.out(y), state

    def _attend_piece(self, q: Tensor, k: Tensor, v: Tensor, state: KVCacheState) -> tuple[Tensor, KVCacheState]:
        """Write the piece into the cache, then its queries attend over slots [0, length + m)."""
        L = state.length
        state = append(state, k, v)
        T = state.length
        slots = torch.arange(T, device=q.device)
        qr = apply_rope(q, slots[L:], self.rope_theta)  # [b, h, m, k]
        kr, state = self._rotated_keys(state, q.dtype)  # [b, h, T, k]
        valid = state.valid[:, :, :T]
        holes = None if bool(valid[:, :, :L].all()) else valid[:, :, None, :]  # [b, h, 1, T]
        vals = state.values[:, :, :T].to(q.dtype)
        if self.policy.needs_attention and not self.memory_off:  # the control ignores the policy: nothing to observe
            out, probs = attend(qr, kr, vals, mask=holes, return_probs=True)
            state.policy = self.policy.observe(state, probs, q.shape[2])
        else:
            out = attend(qr, kr, vals, mask=holes)
        return out, state

    def _rotated_keys(self, state: KVCacheState, dtype: torch.dtype) -> tuple[Tensor, KVCacheState]:
        """The cached keys rotated at their slots, ``[b, h, length, k]`` in ``dtype``.

        With autograd on (training: one call per sequence) every key is rotated here, as the
        reference does. Streaming, the rotations are kept in ``state.rotated`` and only the slots
        written since the last eviction are rotated: the same values bit for bit (each slot's
        rotation depends on its key and slot alone), once per token per eviction period.
        """
        T = state.length
        if torch.is_grad_enabled():
            return apply_rope(state.keys[:, :, :T].to(dtype), torch.arange(T, device=state.keys.device), self.rope_theta), state
        rotated, done = state.rotated, state.n_rotated
        stale = rotated is None or rotated.dtype != dtype or rotated.shape[2] != state.capacity
        if stale or (rotated.is_inference() and not torch.is_inference_mode_enabled()):
            rotated, done = state.keys.new_zeros(state.keys.shape, dtype=dtype), 0
        if done < T:  # after append: this state owns slots [n_rotated, length) of ``rotated`` (see _Frontier)
            slots = torch.arange(done, T, device=state.keys.device)
            rotated[:, :, done:T] = apply_rope(state.keys[:, :, done:T].to(dtype), slots, self.rope_theta)
        return rotated[:, :, :T], replace(state, rotated=rotated, n_rotated=T)

    def _evict(self, state: KVCacheState) -> KVCacheState:
        return evict(_RECENT if self.memory_off else self.policy, state, self.budget)


# ---------------------------------------------------------------------------------- cache maths
def append(state: KVCacheState, k: Tensor, v: Tensor) -> KVCacheState:
    """The cache with ``m`` new tokens written at slots ``[length, length + m)``.

    The caller's state stays valid (state in, state out): its slots ``[0, length)`` are never
    written. Without autograd, and when this state is its buffers' newest writer (the usual case: a
    stream continuing from its last state), the new slots are written in place; otherwise (autograd
    on, an older state continued again, a copy) the buffers are copied first (see :class:`_Frontier`).
    A cache too small for the new tokens grows (``full``, and the hf cache whose calls have any
    size); a bounded memzoo cache never needs to.

    Args:
        state: the cache.
        k: [b, h, m, k] keys of the new tokens (stream positions ``[position, position + m)``).
        v: [b, h, m, v] their values.

    Returns:
        the cache holding them, with ``length`` and ``position`` advanced by m.
    """
    m, L = k.shape[2], state.length
    if L + m > state.capacity:
        state = _grow(state, max(L + m, 2 * state.capacity))
    T = L + m
    new_pos = torch.arange(state.position, state.position + m, device=k.device).expand(*k.shape[:2], m)
    new = {"keys": k.to(state.keys.dtype), "values": v.to(state.values.dtype), "valid": True, "token_pos": new_pos}
    if writes_in_place(state):
        for name, value in new.items():
            getattr(state, name)[:, :, L:T] = value
        state.frontier.end = T
        return replace(state, length=T, position=state.position + m)

    def copied(t: Tensor, value, keep: int = L) -> Tensor:
        # slots [0, keep) from the caller's buffer, then the new ones, then cleared slots (another writer may
        # have left tokens past ``keep`` in a shared buffer)
        out = torch.zeros_like(t) if t.dtype != torch.long else torch.full_like(t, -1)
        out[:, :, :keep] = t[:, :, :keep]
        if value is not None:
            out[:, :, keep:T] = value
        return out

    keys = copied(state.keys, new["keys"])
    rotated = None if state.rotated is None else copied(state.rotated, None, state.n_rotated)
    return replace(
        state,
        keys=keys,
        values=copied(state.values, new["values"]),
        valid=copied(state.valid, True),
        token_pos=copied(state.token_pos, new_pos),
        length=T,
        position=state.position + m,
        rotated=rotated,
        frontier=_Frontier(keys, T),
    )


def writes_in_place(state: KVCacheState) -> bool:
    """Whether the next tokens may be written into ``state``'s buffers in place (see :class:`_Frontier`)."""
    f, keys = state.frontier, state.keys
    return (
        f is not None
        and f.ptr == keys.data_ptr()
        and f.end == state.length
        and not torch.is_grad_enabled()  # autograd may have saved a view of the buffers
        and keys.is_contiguous()  # not an expanded view
        and (torch.is_inference_mode_enabled() or not keys.is_inference())
    )


def evict(policy: EvictionPolicy, state: KVCacheState, budget: int) -> KVCacheState:
    """Keep the policy's best ``budget`` tokens, compacted to the front of the cache (in stream order).

    Args:
        policy: scores the cached tokens (after its :meth:`~EvictionPolicy.before_eviction`).
        state: the cache at an eviction boundary.
        budget: tokens kept at most, per head.

    Returns:
        the compacted cache. Every per-slot tensor, the policy's included, moves with its token,
        and slots left free are zero (``valid`` False, ``token_pos`` -1), so a token written there
        later inherits nothing of the one evicted.
    """
    state = replace(state, policy=policy.before_eviction(state))
    L = state.length
    scores = policy.score(state).float().masked_fill(~state.valid[:, :, :L], float("-inf"))
    scores[..., L - 1] = float("inf")  # the newest token always stays
    if L <= budget and bool((scores > float("-inf")).all()):
        return state  # nothing to evict: avoid copying the cache
    idx, keep = select_slots(scores, state.token_pos[:, :, :L], budget)
    C = state.capacity

    def compact(t: Tensor) -> Tensor:
        # every per-slot tensor (the cache's and the policy's) moves with its token, and a slot that
        # no kept token fills is cleared: a token written there later inherits nothing
        return gather_slots(t, idx, C, keep)

    policy_state = state.policy
    if policy_state is not None:
        compacted = {f.name: compact(v) for f in fields(policy_state) if _is_per_slot(v := getattr(policy_state, f.name), state)}
        policy_state = replace(policy_state, **compacted)
    valid = compact(state.valid)
    keys, length = compact(state.keys), int(keep.sum(-1).max())
    return KVCacheState(
        keys=keys,
        values=compact(state.values),
        valid=valid,
        token_pos=compact(state.token_pos).masked_fill(~valid, -1),
        length=length,
        position=state.position,
        policy=policy_state,
        conv=state.conv,
        rotated=None if state.rotated is None else torch.zeros_like(state.rotated),  # keys moved: rotate again
        frontier=_Frontier(keys, length),  # fresh buffers: this state is their only writer
    )


def _is_per_slot(value, state: KVCacheState) -> bool:
    return isinstance(value, Tensor) and value.dim() >= 3 and value.shape[:3] == state.valid.shape


def _grow(state: KVCacheState, capacity: int) -> KVCacheState:
    """A larger copy of the cache (doubling keeps appends amortised O(1)); per-slot policy tensors grow too."""

    def pad(t: Tensor, fill) -> Tensor:  # slots past ``length`` are cleared: another writer may have used them
        extra = t.new_full((*t.shape[:2], capacity - state.length, *t.shape[3:]), fill)
        return torch.cat([t[:, :, : state.length], extra], dim=2)

    policy = state.policy
    if policy is not None:
        policy = replace(policy, **{f.name: pad(v, 0) for f in fields(policy) if _is_per_slot(v := getattr(policy, f.name), state)})
    keys = pad(state.keys, 0)
    return KVCacheState(
        keys=keys,
        values=pad(state.values, 0),
        valid=pad(state.valid, False),
        token_pos=pad(state.token_pos, -1),
        length=state.length,
        position=state.position,
        policy=policy,
        conv=state.conv,
        rotated=None if state.rotated is None else pad(state.rotated, 0),
        n_rotated=state.n_rotated,
        frontier=_Frontier(keys, state.length),
    )
