"""``EvictingCache``: memzoo's eviction policies on the KV cache of any transformers causal LM.

    cache = memzoo.hf.EvictingCache("h2o", budget=256, evict_every=64)
    with memzoo.hf.attention_probs(model):          # h2o and namm score tokens by their attention
        out = model.generate(ids, cache=cache, prefill_chunk_size=cache.evict_every, max_new_tokens=32)  # past_key_values= before 5.24

Each layer holds a :class:`~memzoo.memories.kv.KVCacheState` and runs it through the very functions
and policy objects of memzoo's own backbone (:func:`~memzoo.memories.kv.append`,
:func:`~memzoo.memories.kv.evict`, ``policy.observe / score``): there is no second copy of any
scoring logic. Differences from memzoo's ``CachedAttention``:

* **Positions.** transformers models rotate keys (RoPE) *before* caching them (Llama calls
  ``past_key_values.update(k, v, layer_idx)`` with rotated keys), so a cached key keeps the rotation
  of its original stream position, and new tokens get their true stream position
  (``get_seq_length()`` counts tokens seen, not kept). memzoo's cache stores un-rotated keys and
  rotates them by *slot* position, so positions never exceed the cache there; here the memory is
  bounded but positions grow with the stream (as in H2O, SnapKV, kvpress). Key norms do not
  depend on the rotation, so ``l2`` scores the same either way.
* **Rhythm.** A model call cannot be cut at eviction boundaries from inside the cache, so the
  tokens of one call all attend over ``[cache | call]``, and the eviction runs right after the call
  that reached or crossed a multiple of ``evict_every`` (after its attention was observed, for h2o
  and namm). With one-token decoding and a prefill chunked at ``evict_every``
  (``prefill_chunk_size``), this is memzoo's rhythm: between calls a layer holds at most
  ``budget + evict_every - 1`` tokens and attention sees at most ``budget + evict_every``. A single
  call of n tokens attends over up to ``budget + evict_every - 1 + n``.
* **Heads and layers.** Policies choose per KV head. Every policy but ``namm`` keeps the same number
  of tokens in every head and layer, so the model's own attention (sdpa, flash...) works with it;
  ``namm`` may keep different numbers (its threshold), leaving holes that
  :func:`memzoo.hf.attention_probs`' attention masks per head.
* **Masks.** Under :func:`memzoo.hf.attention_probs` the mask is built from the kept tokens' stream
  positions, so sliding-window layers (Mistral, Gemma2/3, GPT-OSS) see exactly their window of the
  kept tokens, and a padded batch is refused with an error (after an eviction each row would keep
  other tokens than its padding mask assumes). The model's own attention (sdpa, eager) treats the
  kept tokens as the latest ones, which is true of ``window`` and ``full`` only: ``sinks`` and
  ``l2`` refuse a call outside ``attention_probs`` after their first eviction
  (:attr:`EvictingCache.needs_attention_probs`).
* **Models.** Every layer must be softmax attention through transformers' ``AttentionInterface``;
  :func:`memzoo.hf.check_model` (called by ``attention_probs``) refuses the others (Falcon, Bloom,
  Mamba, Jamba) with a message naming the tested model types.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from ..interface import map_tensors
from ..memories.kv import EvictionPolicy, KVCacheState, append, evict
from ..memories.namm import load_namm_parameters, set_namm_parameters
from ..registry import memory_config

__all__ = ["EvictingCache", "EvictingLayer", "POLICIES"]

POLICIES = ("full", "window", "sinks", "h2o", "l2", "namm")

# (layer, keys, valid) of the latest update: the attention function called right after it with those
# very keys hands the probabilities back to that layer. A ContextVar keeps threads and tasks apart.
_LATEST_UPDATE: ContextVar[tuple[EvictingLayer, Tensor, Tensor, Tensor] | None] = ContextVar("memzoo_latest_update", default=None)


def take_latest_update(key: Tensor) -> tuple[EvictingLayer | None, Tensor | None, Tensor | None]:
    """The layer, validity mask [b, h, T] and stream positions [b, h, T] of the slots behind ``key``,
    if ``key`` is what an EvictingLayer just returned (else three Nones)."""
    latest = _LATEST_UPDATE.get()
    if latest is None or latest[1] is not key:
        return None, None, None
    _LATEST_UPDATE.set(None)
    return latest[0], latest[2], latest[3]


class EvictingLayer(CacheLayerMixin):
    """One layer's cache, managed by an eviction policy (see the module docstring).

    Args:
        policy: the policy (shared by every layer of the cache; per-layer state lives here).
        budget: tokens kept after an eviction (None: never evict).
        evict_every: eviction rhythm in stream tokens.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, policy: EvictionPolicy, budget: int | None, evict_every: int | None, keeps_latest: bool = False):
        super().__init__()
        self.policy, self.budget, self.evict_every = policy, budget, evict_every
        self.keeps_latest = keeps_latest  # what it keeps is always the latest tokens (full, window)
        self.state: KVCacheState | None = None
        self._unobserved = False  # a call whose attention the policy still needs to see
        self._unmasked = False  # a call over kept tokens that are not the latest, not yet masked by memzoo's attention

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        b, h, _, k = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.policy.to(self.device)
        self.state = KVCacheState(
            keys=key_states.new_zeros(b, h, 0, k),
            values=value_states.new_zeros(b, h, 0, value_states.shape[-1]),
            valid=torch.zeros(b, h, 0, dtype=torch.bool, device=self.device),
            token_pos=torch.zeros(b, h, 0, dtype=torch.long, device=self.device),
            policy=self.policy.init_state(b, h, 0, self.device),
        )
        self.keys, self.values = self.state.keys, self.state.values
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Append the call's keys/values [b, h, n, k]; return everything its queries attend over."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._unobserved:
            raise RuntimeError(
                f"eviction policy {type(self.policy).__name__} scores tokens by the attention they receive, but the last "
                "call's attention never reached the cache: run the model inside `with memzoo.hf.attention_probs(model):` "
                f"(or load it with attn_implementation={_attention_name()!r})"
            )
        if self._unmasked:
            raise RuntimeError(
                f"eviction policy {type(self.policy).__name__} keeps tokens that are not the latest ones, but the model's own "
                "attention masks the cache as if they were (sliding windows and padding would be silently wrong): run the "
                f"model inside `with memzoo.hf.attention_probs(model):` (or load it with attn_implementation={_attention_name()!r})"
            )
        state = append(self.state, key_states, value_states)
        T = state.length
        keys, values = state.keys[:, :, :T], state.values[:, :, :T]
        _LATEST_UPDATE.set((self, keys, state.valid[:, :, :T], state.token_pos[:, :, :T]))
        self._unobserved = self.policy.needs_attention
        self._unmasked = not self.keeps_latest and state.position > state.length  # something was evicted before this call
        self._store(state, key_states.shape[2], evict_now=not self.policy.needs_attention)
        return keys, values

    def observe(self, probs: Tensor) -> None:
        """The attention probabilities [b, h, n, T] of the call just made (per KV head); evicts if it was due."""
        state = replace(self.state, policy=self.policy.observe(self.state, probs, probs.shape[2]))
        self._unobserved = False
        self._store(state, probs.shape[2], evict_now=True)

    def _store(self, state: KVCacheState, n: int, evict_now: bool) -> None:
        due = self.budget is not None and state.position // self.evict_every > (state.position - n) // self.evict_every
        if due and evict_now:
            state = evict(self.policy, state, self.budget)
        self.state = state
        self.keys, self.values = state.keys[:, :, : state.length], state.values[:, :, : state.length]

    def get_seq_length(self) -> int:
        """Tokens seen (not kept): what transformers uses to place the next positions."""
        return self.state.position if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Kept tokens + the new ones, as if the kept ones were the latest (they are all visible)."""
        if not self.is_initialized:
            return query_length, 0
        return self.state.length + query_length, self.state.position - self.state.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state, self.keys, self.values = None, None, None
        self.is_initialized, self._unobserved, self._unmasked = False, False, False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("an evicting cache cannot be rolled back (evicted tokens are gone)")

    def _map_batch(self, fn) -> None:
        if self.is_initialized:
            self.state = map_tensors(self.state, fn)  # every state tensor is batch-first
            self.keys, self.values = self.state.keys[:, :, : self.state.length], self.state.values[:, :, : self.state.length]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map_batch(lambda t: t[indices])


class EvictingCache(Cache):
    """A transformers ``Cache`` that keeps at most ``budget`` tokens per layer and KV head, chosen by a memzoo policy.

    Pass it as ``cache`` to ``model.generate(...)`` (``past_key_values`` before transformers 5.24, and
    to ``model(...)``) of any transformers causal LM. ``h2o`` and ``namm`` score tokens by the attention they receive,
    and ``sinks`` and ``l2`` keep tokens that only memzoo's attention masks right: run the model inside
    :func:`memzoo.hf.attention_probs` (or load it with ``attn_implementation=memzoo.hf.ATTENTION``).

    Args:
        policy: one of :data:`POLICIES`: ``full``, ``window``, ``sinks``, ``h2o``, ``l2``, ``namm``.
        budget: tokens kept after each eviction (not for ``full``).
        scorer: ``namm`` only: an evolved scorer, as a flat vector (tensor or array) or a path
            (a file of :func:`~memzoo.memories.namm.save_namm_parameters` or a memzoo ``namm``
            checkpoint folder); default: the untrained (all-zero) scorer, which keeps everything.
        **policy_kwargs: the policy's other knobs, as in ``memzoo.build`` (``evict_every``,
            ``n_sinks``, ``n_recent``).

    Example:
        >>> cache = memzoo.hf.EvictingCache("namm", budget=1024, scorer="checkpoints/namm-evolved")
    """

    def __init__(self, policy: str, budget: int | None = None, *, scorer=None, **policy_kwargs):
        if policy not in POLICIES:
            raise ValueError(f"EvictingCache supports the eviction policies {', '.join(POLICIES)}; got {policy!r}")
        if (policy == "full") != (budget is None):
            raise ValueError("'full' never evicts: give no budget" if budget is not None else f"{policy!r} needs a budget (tokens to keep)")
        config = memory_config(policy, **policy_kwargs, **({} if budget is None else {"budget": budget}))
        self.config = config
        self.policy: EvictionPolicy = config.make_policy()
        self.budget: int | None = budget
        self.evict_every: int | None = getattr(config, "evict_every", None)
        if scorer is not None:
            if policy != "namm":
                raise ValueError(f"scorer= is for 'namm', not {policy!r}")
            set_namm_parameters(self.policy, load_namm_parameters(scorer) if isinstance(scorer, (str, Path)) else scorer)
        self._keeps_latest = policy in ("full", "window")
        layer = partial(EvictingLayer, self.policy, self.budget, self.evict_every, keeps_latest=self._keeps_latest)
        super().__init__(layer_class_to_replicate=layer)

    @property
    def needs_attention_probs(self) -> bool:
        """Whether the model must run inside :func:`memzoo.hf.attention_probs`: ``h2o`` and ``namm``
        score by attention, and ``sinks`` and ``l2`` keep tokens that are not the latest, which only
        that attention masks right (``full`` and ``window`` work with any attention)."""
        return not self._keeps_latest

    def __repr__(self) -> str:
        return f"EvictingCache({self.config!r}, layers={len(self.layers)})"


def _attention_name() -> str:
    from .attention import ATTENTION  # the attention module imports this one

    return ATTENTION



def generate_cache_kwargs(cache) -> dict:
    """The keyword that hands ``cache`` to ``model.generate``: ``{"cache": cache}`` from transformers
    5.24 on (it deprecates the older name), ``{"past_key_values": cache}`` before."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"cache": cache} if (major, minor) >= (5, 24) else {"past_key_values": cache}
