"""memzoo.hf: eviction caches on a tiny random transformers Llama (GQA: 4 query heads, 2 KV heads)."""

from __future__ import annotations

import pytest
import torch
from tolerance import assert_close
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import memzoo
import memzoo.hf as mh
from memzoo.hf.cache import EvictingLayer

ATTENTION_POLICIES = ("h2o", "namm")


@pytest.fixture(scope="module")
def model():
    # a large init range makes greedy decoding decisive (no near-ties between implementations)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def prompt(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def generate(model, ids, cache, **kwargs):
    if cache.needs_attention_probs:
        with mh.attention_probs(model):
            return model.generate(ids, do_sample=False, **mh.generate_cache_kwargs(cache), **kwargs)
    return model.generate(ids, do_sample=False, **mh.generate_cache_kwargs(cache), **kwargs)


@pytest.mark.parametrize("policy", mh.POLICIES)
def test_large_budget_gives_the_tokens_of_dynamic_cache(model, policy):
    ids = prompt(40)
    expected = model.generate(ids, max_new_tokens=12, do_sample=False, **mh.generate_cache_kwargs(DynamicCache(config=model.config)))
    cache = mh.EvictingCache(policy, None if policy == "full" else 256, **({} if policy == "full" else {"evict_every": 16}))
    assert torch.equal(generate(model, ids, cache, max_new_tokens=12), expected)
    assert model.config._attn_implementation == "sdpa"  # attention_probs restored it
    assert all(layer.state.length == layer.state.position == 51 for layer in cache.layers)


@pytest.mark.parametrize("policy", [*mh.POLICIES[1:], "namm-evolved"])
def test_cache_stays_within_budget(model, policy, monkeypatch):
    """Budget 64 on a 512-token prompt (prefill chunked at evict_every = 32): attention never sees more than 64 + 32 tokens."""
    budget, every, seen = 64, 32, []
    update = EvictingLayer.update

    def recording_update(self, *args, **kwargs):
        keys, values = update(self, *args, **kwargs)
        seen.append(keys.shape[2])
        return keys, values

    monkeypatch.setattr(EvictingLayer, "update", recording_update)
    cache = mh.EvictingCache(policy.removesuffix("-evolved"), budget, evict_every=every)
    if policy == "namm-evolved":  # a scorer that evicts below the budget: holes, masked per head
        mh.set_namm_parameters(cache, torch.randn(mh.namm_parameter_count(), generator=torch.Generator().manual_seed(0)) * 0.5)
    out = generate(model, prompt(512), cache, max_new_tokens=20, min_new_tokens=20, prefill_chunk_size=every)
    assert out.shape == (1, 532)
    assert max(seen) <= budget + every
    for layer in cache.layers:
        assert layer.state.position == 531
        assert layer.state.length <= budget + 531 % every
    if policy == "namm-evolved":
        assert any(int(layer.state.valid.sum()) < 2 * (budget + 531 % every) for layer in cache.layers)


def test_memzoo_attention_equals_sdpa_after_evictions(model):
    """The same window cache gives the same tokens under the model's sdpa (mask from get_mask_sizes) and under memzoo's attention."""
    ids, kwargs = prompt(200), dict(max_new_tokens=40, min_new_tokens=40, do_sample=False, prefill_chunk_size=32)
    plain = model.generate(ids, past_key_values=mh.EvictingCache("window", 64, evict_every=32), **kwargs)
    with mh.attention_probs(model):
        hooked = model.generate(ids, past_key_values=mh.EvictingCache("window", 64, evict_every=32), **kwargs)
    assert torch.equal(plain, hooked)


@pytest.mark.parametrize("chunk", [100, 20])
def test_l2_keeps_the_lowest_norm_keys(model, chunk):
    """After 100 tokens: the 8 most recent plus the 24 lowest-norm keys of the rest, per layer and KV head, with their original rotation.

    In one call, or in five (four earlier evictions; a norm never changes, so what an earlier eviction
    dropped could never be among the final lowest). With several calls only layer 0's keys are those
    of a full cache: deeper keys depend on attention over the evicted cache.
    """
    ids = prompt(100)
    reference = DynamicCache(config=model.config)
    with torch.no_grad(), mh.attention_probs(model):
        model(ids, past_key_values=reference)
        cache = mh.EvictingCache("l2", 32, evict_every=20, n_recent=8)
        for start in range(0, 100, chunk):
            model(ids[:, start : start + chunk], past_key_values=cache)
    layers = cache.layers if chunk == 100 else cache.layers[:1]
    for i, (layer, ref) in enumerate(zip(layers, reference.layers)):
        keys = ref.keys[0]  # [h, 100, k], rotated
        # layer 0's keys are one k_proj (inner dim hidden_size) of the normed embeddings, in calls of
        # another size; a deeper layer's also pass the layers below (longest reduction: the MLP's)
        op = dict(n=model.config.hidden_size) if i == 0 else dict(n=model.config.intermediate_size, depth=i + 1)
        for h in range(keys.shape[0]):
            norms = keys[h, :92].float().norm(dim=-1)
            lowest = sorted(sorted(range(92), key=lambda j: (-norms[j].item(), j), reverse=True)[:24])
            expected = [*lowest, *range(92, 100)]
            assert layer.state.token_pos[0, h, : layer.state.length].tolist() == expected
            assert_close(layer.keys[0, h], keys[h, expected], **op)


def test_untrained_namm_keeps_everything(model):
    cache = mh.EvictingCache("namm", 1024, evict_every=16)
    generate(model, prompt(100), cache, max_new_tokens=5)
    for layer in cache.layers:
        assert layer.state.length == layer.state.position == 104 and bool(layer.state.valid[..., :104].all())
        assert layer.state.policy.count.item() > 0  # the NAMM steps ran


def test_attention_policies_need_the_attention_hook(model):
    cache = mh.EvictingCache("h2o", 32, evict_every=16)
    with pytest.raises(RuntimeError, match="attention_probs"):
        model.generate(prompt(40), max_new_tokens=3, past_key_values=cache)


@pytest.mark.parametrize("policy", ["sinks", "l2"])
def test_policies_that_keep_older_tokens_need_memzoo_masks(model, policy):
    """Under the model's own attention the kept tokens would be masked as if they were the latest."""
    cache = mh.EvictingCache(policy, 16, evict_every=8)
    assert cache.needs_attention_probs and not mh.EvictingCache("window", 16, evict_every=8).needs_attention_probs
    with torch.no_grad(), pytest.raises(RuntimeError, match="not the latest"):
        model.generate(prompt(40), max_new_tokens=3, prefill_chunk_size=8, **mh.generate_cache_kwargs(cache))


def test_namm_scorer_from_a_vector_or_a_checkpoint(tmp_path):
    vec = torch.randn(mh.namm_parameter_count(), generator=torch.Generator().manual_seed(0))
    assert torch.equal(mh.namm_parameters(mh.EvictingCache("namm", 64, scorer=vec)), vec)
    trained = memzoo.build("namm", d_model=32, n_layers=2, n_heads=2, budget=16, evict_every=8)
    mh.set_namm_parameters(trained, vec)
    trained.save_pretrained(tmp_path / "ckpt")
    mh.save_namm_parameters(tmp_path / "best.safetensors", vec)
    for source in (tmp_path / "ckpt", str(tmp_path / "best.safetensors")):
        assert torch.equal(mh.namm_parameters(mh.EvictingCache("namm", 64, scorer=source)), vec)
    cache = mh.EvictingCache("namm", 64)
    mh.set_namm_parameters(cache, vec)
    assert torch.equal(mh.namm_parameters(cache), vec)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (("infini", 64), {}, "supports the eviction policies"),
        (("full", 64), {}, "never evicts"),
        (("window",), {}, "needs a budget"),
        (("window", 64), {"scorer": torch.zeros(4172)}, "for 'namm'"),
        (("window", 0), {}, "budget must be >= 1, got 0"),
    ],
)
def test_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        mh.EvictingCache(*args, **kwargs)
    with pytest.raises(TypeError, match="n_sink"):
        mh.EvictingCache("window", 64, n_sinks=2)
