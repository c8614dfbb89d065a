"""One attention entry point for every design.

Dispatch: flash-attn on CUDA when it is importable and the call needs no explicit mask, PyTorch
SDPA otherwise, and an explicit-probabilities path for eviction policies that score tokens by the
attention they receive (H2O, NAMM).

Causality convention (flash-attn's "bottom-right" alignment): with s queries and t >= s keys, query
i sits at key index ``t - s + i`` and may see keys up to that index. This is exactly the layout of
"the segment's queries over [cache | segment]".
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["attend", "causal_mask", "flash_available"]

try:  # optional GPU extra
    from flash_attn import flash_attn_func as _flash_attn_func
except Exception:  # noqa: BLE001 - any import failure just means "not available"
    _flash_attn_func = None


def flash_available(device: torch.device) -> bool:
    """Whether attention on ``device`` would use flash-attn."""
    return _flash_attn_func is not None and torch.device(device).type == "cuda"


def causal_mask(s: int, t: int, *, window: int | None = None, device=None) -> Tensor:
    """Bottom-right aligned causal mask, True where query i may see key j.

    Args:
        s: queries; t: keys (t >= s); query i sits at key index ``t - s + i``.
        window: if given, query i sees only the ``window`` most recent keys (itself included).

    Returns:
        [s, t] bool. The same shapes recur at every call of a stream (a piece of ``evict_every``
        queries over the cache, a block over its window), so the last few masks are kept and
        **shared**: never modify the result in place (``mask & other`` makes a new tensor).
    """
    if t < s:
        raise ValueError(f"causal attention needs at least as many keys as queries, got s={s}, t={t}")
    return _causal_mask(s, t, window, torch.device(device) if device is not None else torch.device("cpu"))


@functools.lru_cache(maxsize=16)
def _causal_mask(s: int, t: int, window: int | None, device: torch.device) -> Tensor:
    with torch.inference_mode(False):  # a mask first made during evaluation must serve training too
        return _make_causal_mask(s, t, window, device)


def _bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool mask (True = may attend) as an additive bias of its own shape: 0 or -inf.

    Adding it gives the very bits ``masked_fill(~mask, -inf)`` gives (``x + 0 == x``), and a small
    mask (a per-head ``[b, h, 1, t]``: the cache's holes) is broadcast by the add, where a masked
    fill over ``[b, h, s, t]`` is several times slower on CPU.
    """
    return torch.zeros(mask.shape, device=mask.device, dtype=dtype).masked_fill_(~mask, float("-inf"))


@functools.lru_cache(maxsize=8)
def _causal_bias(s: int, t: int, window: int | None, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The causal mask as SDPA's additive bias: 0 where a query may attend, -inf elsewhere ([s, t], ``dtype``)."""
    with torch.inference_mode(False):
        allowed = _causal_mask(s, t, window, device)
        return torch.zeros(s, t, device=device, dtype=dtype).masked_fill(~allowed, float("-inf"))


def _make_causal_mask(s: int, t: int, window: int | None, device: torch.device) -> Tensor:
    q_pos = torch.arange(t - s, t, device=device)[:, None]  # [s, 1]
    k_pos = torch.arange(t, device=device)[None, :]  # [1, t]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    mask: Tensor | None = None,
    return_probs: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Scaled dot-product attention.

    Args:
        q: [b, h, s, k] queries.
        k: [b, h, t, k] keys; v: [b, h, t, v] values.
        causal: bottom-right causal masking (see module docstring).
        window: sliding window size for the causal mask (keys older than that are hidden).
        mask: optional extra bool mask broadcastable to [b, h, s, t], True = may attend; combined
            with the causal mask by AND. Every query must keep at least one key.
        return_probs: also return the attention probabilities [b, h, s, t] (explicit path, fp32
            softmax): what attention-scored eviction policies consume.

    Returns:
        out [b, h, s, v], and probs [b, h, s, t] if ``return_probs``.
    """
    s, t = q.shape[-2], k.shape[-2]
    if window is not None and not causal:
        raise ValueError("window needs causal=True")
    if causal and t < s:
        raise ValueError(f"causal attention needs at least as many keys as queries, got s={s}, t={t}")
    if return_probs:
        return _explicit_attention(q, k, v, _causal_bias(s, t, window, q.device, torch.float32) if causal else None, mask)

    if mask is None and flash_available(q.device) and q.dtype in (torch.float16, torch.bfloat16):
        # flash-attn wants [b, s, h, k]; its causal flag is bottom-right aligned like ours.
        w = (window - 1, 0) if window is not None else (-1, -1)
        out = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal, window_size=w)
        return out.transpose(1, 2)

    causal_part = causal and (t != s or window is not None or mask is not None)  # else SDPA's own is_causal
    if mask is None and not causal_part:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    # SDPA gets the mask in additive form rather than as a bool mask it would turn into that very tensor (a
    # torch.where over [b, h, s, t]) at every call: the causal part is kept like the mask, and a per-head mask
    # ([b, h, 1, t]: the cache's holes) is broadcast by one add
    bias = _bias(mask, q.dtype) if mask is not None else None
    if causal_part:
        cb = _causal_bias(s, t, window, q.device, q.dtype)
        bias = cb if bias is None else bias + cb
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


#: queries per block of the explicit-probabilities path without autograd: a block's scores stay in cache
#: through scale, mask, softmax and the product with the values (``memzoo bench``'s h2o stream measures it)
QUERY_BLOCK = 64


def _explicit_attention(q: Tensor, k: Tensor, v: Tensor, causal_bias: Tensor | None, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Attention with its probabilities (fp32 softmax), by blocks of :data:`QUERY_BLOCK` queries.

    Each query's row is computed by the same ops in the same order whatever the blocking (the
    reductions run over the head dim and over the keys, never over queries), so the blocks give
    one block's numbers bit for bit. With autograd on it is one block: the blocked form fills
    preallocated tensors in place, which would only add copies to the backward graph.
    """
    s, t = q.shape[-2], k.shape[-2]
    qf, kt = q.float(), k.float().transpose(-1, -2)
    bias = _bias(mask, torch.float32) if mask is not None else None
    scale = math.sqrt(q.shape[-1])

    def scores_of(rows: slice) -> Tensor:
        scores = qf[..., rows, :] @ kt  # [..., block, t], edited in place
        scores.div_(scale)
        if causal_bias is not None:
            scores.add_(causal_bias[rows])
        if bias is not None:
            scores.add_(bias[..., rows, :] if bias.shape[-2] == s else bias)
        return scores

    if s <= QUERY_BLOCK or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        probs = scores_of(slice(0, s)).softmax(dim=-1)
        return probs.to(v.dtype) @ v, probs
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    probs = q.new_empty(*batch, s, t, dtype=torch.float32)
    out = v.new_empty(*batch, s, v.shape[-1])
    for start in range(0, s, QUERY_BLOCK):
        rows = slice(start, min(s, start + QUERY_BLOCK))
        block = torch.softmax(scores_of(rows), dim=-1)
        probs[..., rows, :] = block
        out[..., rows, :] = block.to(v.dtype) @ v
    return out, probs

