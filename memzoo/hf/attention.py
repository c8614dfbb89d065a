"""The attention hook of the eviction cache: softmax attention that hands its probabilities to the cache.

Registered with transformers under the name :data:`ATTENTION` (adding a name changes nothing until a
model chooses it; nothing is patched). A model uses it either for good
(``from_pretrained(..., attn_implementation=memzoo.hf.ATTENTION)``) or for a block of code::

    with memzoo.hf.attention_probs(model):
        model.generate(ids, cache=memzoo.hf.EvictingCache("h2o", budget=256))  # past_key_values= before transformers 5.24

When the keys it receives are those an :class:`~memzoo.hf.EvictingCache` layer just returned, it
masks that layer's holes per head (``namm``) and gives the layer the probabilities of the call, per
KV head (the mean over the query heads of a group, for grouped-query attention). Otherwise it is
plain causal softmax attention. Either way it ignores padding (see ``memzoo.hf.cache``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from einops import reduce
from torch import Tensor, nn
from transformers import AttentionInterface

from ..ops.attention import attend
from .cache import take_latest_update

__all__ = ["ATTENTION", "evicting_attention", "attention_probs"]

ATTENTION = "memzoo"


def evicting_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """A transformers attention function (``AttentionInterface``) for eviction caches.

    Args:
        module: the calling attention module.
        query: [b, H, n, k] (H = query heads).
        key: [b, h, T, k] (h = KV heads, H a multiple of h); value: [b, h, T, v].
        attention_mask: an explicit 4-D mask [b, 1|H, n, T] (bool, or additive float), or None;
            the bottom-right causal mask is always applied.
        scaling: softmax scale (default 1/sqrt(k)).
        dropout: must be 0 (inference only).

    Returns:
        out [b, n, H, v] and probs [b, H, n, T].
    """
    if dropout:
        raise ValueError(f"{ATTENTION!r} attention is for inference: got dropout={dropout}; call model.eval()")
    layer, valid = take_latest_update(key)
    groups = query.shape[1] // key.shape[1]
    if scaling is not None:
        query = query * (scaling * math.sqrt(query.shape[-1]))  # attend scales by 1/sqrt(k)
    mask = None
    if valid is not None and not bool(valid.all()):
        mask = valid.repeat_interleave(groups, dim=1)[:, :, None, :]  # [b, H, 1, T]: namm's holes
    if attention_mask is not None:
        allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0  # additive: 0 = allowed
        mask = allowed if mask is None else mask & allowed
    # query head i uses KV head i // groups (transformers' repeat_kv layout)
    k, v = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out, probs = attend(query, k, v, mask=mask, return_probs=True)
    if layer is not None and layer.policy.needs_attention:
        layer.observe(reduce(probs, "b (h g) n t -> b h n t", "mean", g=groups))
    return out.transpose(1, 2).contiguous(), probs


AttentionInterface.register(ATTENTION, evicting_attention)


@contextmanager
def attention_probs(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` (a transformers model) with :func:`evicting_attention` inside the block, then restore its attention."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
