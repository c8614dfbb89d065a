"""The attention hook of the eviction cache: softmax attention that hands its probabilities to the cache.

Registered with transformers under the name :data:`ATTENTION` (adding a name changes nothing until a
model chooses it; nothing is patched). A model uses it either for good
(``from_pretrained(..., attn_implementation=memzoo.hf.ATTENTION)``) or for a block of code::

    with memzoo.hf.attention_probs(model):
        model.generate(ids, cache=memzoo.hf.EvictingCache("h2o", budget=256))  # past_key_values= before transformers 5.24

When the keys it receives are those an :class:`~memzoo.hf.EvictingCache` layer just returned, it
masks that layer's holes per head (``namm``) and gives the layer the probabilities of the call, per
KV head (the mean over the query heads of a group, for grouped-query attention). Otherwise it is
plain causal softmax attention under transformers' own mask (causal, sliding window, padding).

With an EvictingCache it rebuilds the mask from the stream positions of the kept tokens (causal and
the layer's sliding window), since after an eviction the slots are not the contiguous positions
transformers' mask assumes; padded batches are refused there (each row would keep other tokens).
Gemma2's logit soft-capping and GPT-OSS's sink logits are honoured.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from einops import reduce
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..ops.attention import attend, causal_mask
from .cache import take_latest_update

__all__ = ["ATTENTION", "evicting_attention", "attention_probs", "check_model", "TESTED_MODELS"]

ATTENTION = "memzoo"


def evicting_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: Tensor | None = None,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """A transformers attention function (``AttentionInterface``) for eviction caches.

    Args:
        module: the calling attention module.
        query: [b, H, n, k] (H = query heads).
        key: [b, h, T, k] (h = KV heads, H a multiple of h); value: [b, h, T, v].
        attention_mask: the 4-D mask transformers built for this layer [b, 1|H, n, T] (bool, or
            additive float), or None; the bottom-right causal mask is always applied. When the keys
            are an :class:`~memzoo.hf.EvictingCache` layer's, the mask is rebuilt from the stream
            positions of the tokens the layer kept (causal, and ``sliding_window``), because after an
            eviction the slots are no longer the contiguous positions transformers' mask assumes.
        scaling: softmax scale (default 1/sqrt(k)).
        dropout: must be 0 (inference only).
        sliding_window: the layer's window (Mistral, Gemma2/3, GPT-OSS pass it): a query at p sees
            keys at positions > p - sliding_window.
        softcap: logit soft-capping (Gemma2): ``softcap * tanh(scores / softcap)`` before the mask.
        s_aux: per-head sink logits [H] (GPT-OSS): a column that takes part in the softmax, then
            is dropped, so a query may attend to "nothing".

    Returns:
        out [b, n, H, v] and probs [b, H, n, T]; probs is None (as transformers' ``sdpa`` returns) when no
        policy reads them (no eviction cache, or one whose policy does not score by attention), and the
        output is then SDPA's, without the probabilities materialised.
    """
    if dropout:
        raise ValueError(f"{ATTENTION!r} attention is for inference: got dropout={dropout}; call model.eval()")
    layer, valid, token_pos = take_latest_update(key)
    groups = query.shape[1] // key.shape[1]
    n, T = query.shape[2], key.shape[2]
    if layer is not None:
        layer._unmasked = False  # this very call is masked by the kept tokens' positions
        if attention_mask is not None and _has_padding(attention_mask):
            raise ValueError(
                "memzoo.hf.EvictingCache got a padded batch: after an eviction each row keeps other tokens, and transformers' "
                "padding mask no longer lines up with them. Generate one row at a time, or rows of equal length without padding"
            )
        # query positions: the last n tokens the layer has seen
        q_pos = layer.state.position - n + torch.arange(n, device=key.device)  # [n]
        all_valid = bool(valid.all())
        if all_valid and bool((token_pos[..., -1] - token_pos[..., 0] == T - 1).all()):
            # the slots hold consecutive stream positions (nothing evicted yet, e.g. a prompt's prefill): the mask
            # below is then exactly the bottom-right causal one (and window): attention's own, kept, not [b, H, n, T]
            mask = None if sliding_window is None else causal_mask(n, T, window=sliding_window, device=key.device)
        elif all_valid and n == 1 and sliding_window is None:
            mask = None  # one new token (decoding): every kept token precedes it, so it sees them all
        else:
            mask = (valid & (token_pos >= 0))[:, :, None, :] & (token_pos[:, :, None, :] <= q_pos[:, None])  # [b, h, n, T]
            if sliding_window is not None:
                mask = mask & (token_pos[:, :, None, :] > q_pos[:, None] - sliding_window)
            mask = mask.repeat_interleave(groups, dim=1)  # [b, H, n, T]
    else:
        mask = None
        if attention_mask is not None:
            mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0  # additive: 0 = allowed
        if sliding_window is not None and attention_mask is None:
            mask = causal_mask(n, T, window=sliding_window, device=query.device)
    # query head i uses KV head i // groups (transformers' repeat_kv layout)
    k, v = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else 1 / math.sqrt(query.shape[-1])
    observed = layer is not None and layer.policy.needs_attention
    if softcap is None and s_aux is None and not observed:  # nobody reads the probabilities: SDPA, as transformers' sdpa
        out, probs = attend(query * (scale * math.sqrt(query.shape[-1])), k, v, mask=mask), None
    elif softcap is None and s_aux is None:
        out, probs = attend(query * (scale * math.sqrt(query.shape[-1])), k, v, mask=mask, return_probs=True)  # attend scales by 1/sqrt(k)
    else:
        out, probs = _capped_attention(query, k, v, mask, scale, softcap, s_aux)
    if observed:
        layer.observe(reduce(probs, "b (h g) n t -> b h n t", "mean", g=groups))
    return out.transpose(1, 2).contiguous(), probs


def _capped_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, softcap: float | None,
                      sinks: Tensor | None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Explicit fp32 attention with Gemma2's logit soft-capping and GPT-OSS's sink logits (bottom-right causal)."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # [b, H, n, T]
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    allowed = causal_mask(q.shape[2], k.shape[2], device=q.device)
    allowed = allowed if mask is None else allowed & mask
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        b, H, n, _ = scores.shape
        scores = torch.cat([scores, sinks.float().view(1, H, 1, 1).expand(b, H, n, 1)], dim=-1)
        probs = scores.softmax(dim=-1)[..., :-1]
    else:
        probs = scores.softmax(dim=-1)
    return probs.to(v.dtype) @ v, probs


def _has_padding(attention_mask: Tensor) -> bool:
    """Whether a 4-D mask hides a key from some row that another row sees (padding, not causality)."""
    allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    return allowed.shape[0] > 1 and not bool((allowed == allowed[:1]).all())


AttentionInterface.register(ATTENTION, evicting_attention)
# transformers builds each layer's mask (causal, sliding, padding) for a registered name only: without
# this it passed None, and sliding-window models attended over keys outside their window.
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


#: model types the architecture-matrix test runs (every policy: exact with a large budget, bounded with a small one)
TESTED_MODELS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox", "opt", "gpt_oss")

# layer types whose attention the mask above reproduces from the kept tokens' stream positions
_ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")


def check_model(model: nn.Module) -> None:
    """Raise ``ValueError`` unless an :class:`~memzoo.hf.EvictingCache` can manage ``model``'s attention.

    The cache needs every layer to be softmax attention computed through transformers'
    ``AttentionInterface`` (that is where :func:`evicting_attention` sees the probabilities and masks
    the kept tokens). Models that compute attention in their own code (Falcon, Bloom) or have layers
    that are not attention (Mamba, Jamba, linear-attention hybrids) are refused, naming the tested ones.
    """
    name = type(model).__name__
    supported = (
        f"memzoo.hf is tested on the model types {', '.join(TESTED_MODELS)} "
        "(and works on models whose every layer is attention through transformers' AttentionInterface)"
    )
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(
            f"{name} computes its attention outside transformers' AttentionInterface (or has no attention layers), "
            f"so an EvictingCache cannot see or mask it; {supported}"
        )
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    other = sorted({t for t in getattr(config, "layer_types", None) or () if t not in _ATTENTION_LAYER_TYPES})
    if other:
        raise ValueError(
            f"{name} has layers of type {', '.join(other)}, which an EvictingCache cannot manage "
            f"(it handles {', '.join(_ATTENTION_LAYER_TYPES)}); {supported}"
        )


@contextmanager
def attention_probs(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` (a transformers model) with :func:`evicting_attention` inside the block, then restore its attention.

    Raises:
        ValueError: from :func:`check_model`, for a model whose attention the cache cannot manage.
    """
    check_model(model)
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
