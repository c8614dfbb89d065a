"""The attention entry point's causal masks: bottom-right alignment, windows, and the kept masks."""

from __future__ import annotations

import torch

from memzoo.ops.attention import attend, causal_mask


def naive_mask(s: int, t: int, window: int | None = None) -> torch.Tensor:
    """Query i sits at key index t - s + i and sees keys j <= that index (and > index - window)."""
    return torch.tensor([[j <= t - s + i and (window is None or j > t - s + i - window) for j in range(t)] for i in range(s)])


def test_masks_match_the_definition_and_are_shared():
    for s, t, window in [(1, 1, None), (3, 7, None), (4, 9, 3), (5, 5, 2)]:
        assert torch.equal(causal_mask(s, t, window=window), naive_mask(s, t, window))
    assert causal_mask(4, 9, window=3) is causal_mask(4, 9, window=3)  # kept: streams repeat their shapes
    assert causal_mask(4, 9) is not causal_mask(4, 9, window=3)


def test_a_mask_first_made_in_inference_mode_serves_training():
    """Evaluation (inference mode) and training share a process: a kept mask must not be an inference tensor."""
    with torch.inference_mode():
        assert not causal_mask(5, 11, window=4).is_inference()
    q = torch.randn(1, 2, 5, 8, requires_grad=True)
    k, v = torch.randn(1, 2, 11, 8), torch.randn(1, 2, 11, 8)
    attend(q, k, v, window=4).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_the_kept_additive_causal_bias_gives_sdpas_own_result_exactly():
    """attend hands SDPA the causal mask as a kept additive bias; SDPA turns a bool mask into that very
    tensor (0 / -inf) itself, so the outputs are bit-identical to passing the bool mask."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    for s, t, window in [(6, 6, 3), (5, 19, None), (9, 30, 4)]:  # shapes that need an explicit mask
        q, k, v = torch.randn(1, 2, s, 8), torch.randn(1, 2, t, 8), torch.randn(1, 2, t, 8)
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=naive_mask(s, t, window))
        assert torch.equal(attend(q, k, v, window=window), expected)
        with torch.inference_mode():  # the bias kept here must serve the training-mode call after it
            assert torch.equal(attend(q, k, v, window=window), expected)
    k, v = torch.randn(1, 2, 23, 8), torch.randn(1, 2, 23, 8)
    with torch.inference_mode():  # a shape first seen in evaluation...
        attend(torch.randn(1, 2, 5, 8), k, v)
    q = torch.randn(1, 2, 5, 8, requires_grad=True)
    attend(q, k, v).sum().backward()  # ...then trained on
    assert torch.isfinite(q.grad).all()


def test_per_head_masks_as_additive_bias_give_the_masked_fill_results_exactly():
    """A per-head mask (the cache's holes, [b, h, 1, t]) goes in as an additive 0 / -inf bias, on both paths:
    adding 0 leaves a score's bits as they are, so the results equal the plain masked definitions bit for bit."""
    import math

    import torch.nn.functional as F

    torch.manual_seed(0)
    s, t = 5, 19
    q, k, v = torch.randn(2, 3, s, 8), torch.randn(2, 3, t, 8), torch.randn(2, 3, t, 8)
    holes = torch.rand(2, 3, 1, t) > 0.3
    holes[..., -s:] = True  # every query keeps at least itself
    full = holes & naive_mask(s, t)
    scores = ((q @ k.transpose(-1, -2)) / math.sqrt(8)).masked_fill(~full, float("-inf"))
    probs = scores.softmax(-1)
    out, got = attend(q, k, v, mask=holes, return_probs=True)
    assert torch.equal(got, probs) and torch.equal(out, probs @ v)
    assert torch.equal(attend(q, k, v, mask=holes), F.scaled_dot_product_attention(q, k, v, attn_mask=full))
    both = attend(q, k, v, mask=holes, causal=False, return_probs=True)[1]  # no causal part: the mask alone
    assert torch.equal(both, ((q @ k.transpose(-1, -2)) / math.sqrt(8)).masked_fill(~holes, float("-inf")).softmax(-1))


def test_explicit_attention_by_query_blocks_gives_one_blocks_numbers_exactly():
    """Without autograd the explicit path runs by blocks of QUERY_BLOCK queries; each query's row is reduced over the
    head dim and the keys only, in the same order, so blocks and one block agree bit for bit (and with autograd on,
    where it is one block, gradients flow)."""
    from memzoo.ops.attention import QUERY_BLOCK

    torch.manual_seed(0)
    s, t = 2 * QUERY_BLOCK + 7, 3 * QUERY_BLOCK
    q, k, v = torch.randn(1, 2, s, 8), torch.randn(1, 2, t, 8), torch.randn(1, 2, t, 8)
    holes = torch.rand(1, 2, 1, t) > 0.3
    holes[..., -s:] = True
    rows = torch.rand(1, 2, s, t) > 0.2
    rows[..., -s:] |= torch.eye(s, dtype=torch.bool)  # every query keeps itself
    for kw in [{}, {"window": 40}, {"mask": holes}, {"mask": rows}, {"mask": holes, "causal": False}]:
        with torch.no_grad():
            blocked = attend(q, k, v, return_probs=True, **kw)
        qg = q.clone().requires_grad_()
        one = attend(qg, k, v, return_probs=True, **kw)  # autograd on: a single block
        assert torch.equal(blocked[0], one[0].detach()) and torch.equal(blocked[1], one[1].detach()), kw
        one[0].sum().backward()
        assert torch.isfinite(qg.grad).all()
