"""The eviction cache on every tested transformers architecture, tiny random models built from configs.

For each architecture x policy: with a budget that holds the whole stream the cache gives exactly
the tokens of transformers' own DynamicCache (greedy, the untrained NAMM scorer), and with a small
budget no layer ever holds more than ``budget + evict_every`` tokens. Models the cache cannot manage
are refused by name.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import memzoo.hf as mh
from memzoo.hf.cache import EvictingLayer

VOCAB, PROMPT, NEW = 128, 40, 8
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=64, max_position_embeddings=256, head_dim=8)  # fmt: skip
ARCHITECTURES = {
    "llama": {},
    "mistral": dict(sliding_window=8),
    "qwen2": {},
    "qwen3": {},
    "gemma2": dict(sliding_window=8, attn_logit_softcapping=20.0, final_logit_softcapping=10.0),
    "gemma3_text": dict(sliding_window=8, sliding_window_pattern=2),
    "phi3": dict(pad_token_id=0),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=256),
    "gpt_neox": dict(rotary_pct=1.0),
    "opt": dict(ffn_dim=64, word_embed_proj_dim=32),
    "gpt_oss": dict(sliding_window=8, num_local_experts=2, num_experts_per_tok=1),
}
POLICIES = {"full": {}, "window": dict(evict_every=8), "sinks": dict(evict_every=8, n_sinks=4),
            "h2o": dict(evict_every=8), "l2": dict(evict_every=8), "namm": dict(evict_every=8)}  # fmt: skip
assert set(ARCHITECTURES) == set(mh.TESTED_MODELS)


def tiny_model(model_type: str):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **COMMON, **ARCHITECTURES[model_type])
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def arch(request):
    model = tiny_model(request.param)
    ids = torch.randint(1, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    return model, ids, reference


def generate(model, ids, cache):
    with torch.no_grad(), mh.attention_probs(model):
        return model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0, prefill_chunk_size=8,
                              **mh.generate_cache_kwargs(cache))  # fmt: skip


@pytest.mark.parametrize("policy", list(POLICIES))
def test_a_budget_that_holds_everything_gives_the_models_own_tokens(arch, policy):
    model, ids, reference = arch
    cache = mh.EvictingCache(policy, None if policy == "full" else 256, **POLICIES[policy])
    assert torch.equal(generate(model, ids, cache), reference)


@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "full"])
def test_a_small_budget_bounds_every_layer(arch, policy, monkeypatch):
    model, ids, _ = arch
    budget, every = 16, POLICIES[policy]["evict_every"]
    seen = []
    update = EvictingLayer.update

    def recording_update(self, *args, **kwargs):
        keys, values = update(self, *args, **kwargs)
        seen.append(keys.shape[2])  # what this call's attention sees
        return keys, values

    monkeypatch.setattr(EvictingLayer, "update", recording_update)
    cache = mh.EvictingCache(policy, budget, **POLICIES[policy])
    if policy == "namm":  # the untrained scorer keeps everything; a random one evicts, leaving holes
        mh.set_namm_parameters(cache, torch.randn(mh.namm_parameter_count(), generator=torch.Generator().manual_seed(0)) * 0.5)
    out = generate(model, ids, cache)
    assert out.shape[1] == PROMPT + NEW
    assert max(seen) <= budget + every
    assert cache.get_seq_length() == PROMPT + NEW - 1  # the last new token is never fed back
    assert all(layer.state.length <= budget + every for layer in cache.layers)


@pytest.mark.parametrize("model_type, kwargs", [
    ("falcon", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)),
    ("bloom", dict(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)),
    ("mamba", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=4)),
])  # fmt: skip
def test_models_the_cache_cannot_manage_are_refused(model_type, kwargs):
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kwargs))
    with pytest.raises(ValueError, match="tested on the model types llama"):
        with mh.attention_probs(model):
            pass


def test_a_padded_batch_is_refused():
    model = tiny_model("llama")
    ids = torch.randint(1, VOCAB, (2, PROMPT), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding on the second row
    with torch.no_grad(), mh.attention_probs(model), pytest.raises(ValueError, match="padded batch"):
        model(ids, attention_mask=mask, **mh.generate_cache_kwargs(mh.EvictingCache("h2o", 16, evict_every=8)))
