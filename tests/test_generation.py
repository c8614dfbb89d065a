"""memzoo models generate through transformers' GenerationMixin: greedy, sampling, beams, configs, pipeline.

The reference is the naive loop: stream the prompt, then one token per call with argmax. Beam
scores are checked against log-probabilities recomputed from a fresh stream of each returned
sequence, so a state that did not follow its beam shows up as a wrong score.
"""

from __future__ import annotations

import pytest
import torch
from tolerance import assert_close
from transformers import GenerationConfig, pipeline

import memzoo

TINY = dict(d_model=32, n_layers=2, n_heads=2)
DESIGNS = ["full", "infini", "titans-mac", "titans-mag", "h2o", "namm"]


def ids(b: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 259, (b, n), generator=torch.Generator().manual_seed(seed))


def model_of(name: str):
    torch.manual_seed(0)
    return memzoo.build(name, **TINY).eval()


@torch.no_grad()
def naive_greedy(model, prompt: torch.Tensor, new: int) -> torch.Tensor:
    out = model.stream(prompt, 5)
    state, logits, picked = out.state, out.logits, [prompt]
    for _ in range(new):
        token = logits.argmax(-1)[:, None]
        picked.append(token)
        step = model(token, state=state)
        state, logits = step.state, step.logits[:, -1]
    return torch.cat(picked, dim=1)


@pytest.mark.parametrize("name", DESIGNS)
@pytest.mark.parametrize("segment_len", [4, None])
def test_greedy_equals_the_naive_loop(name, segment_len):
    model, prompt = model_of(name), ids(2, 23)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, segment_len=segment_len), naive_greedy(model, prompt, 6))


@pytest.mark.parametrize("name", ["full", "titans-mac"])
def test_a_batch_one_state_serves_a_batch_of_questions(name):
    model, context, questions = model_of(name), ids(1, 30, seed=1), ids(3, 5, seed=2)
    state = model.stream(context, 8).state
    out, final = model.generate(questions, state=state, max_new_tokens=4, return_state=True)
    whole = naive_greedy(model, torch.cat([context.expand(3, -1), questions], dim=1), 4)
    assert torch.equal(out, whole[:, 30:])
    assert final.batch_size == 3 and final.position == 30 + 5 + 3  # every generated token but the last was read


def test_sampling_honours_top_k_and_the_seed():
    model, prompt = model_of("titans-mac"), ids(2, 17)
    torch.manual_seed(3)
    a = model.generate(prompt, max_new_tokens=5, do_sample=True, top_k=3, num_return_sequences=4)
    torch.manual_seed(3)
    b = model.generate(prompt, max_new_tokens=5, do_sample=True, top_k=3, num_return_sequences=4)
    assert torch.equal(a, b) and a.shape == (8, 22)
    assert torch.equal(model.generate(prompt, max_new_tokens=5, do_sample=True, top_k=1), naive_greedy(model, prompt, 5))
    for row in range(8):  # every sampled token is among the top 3 after its own prefix
        logits = model.stream(a[row : row + 1, :-1], 6, keep_logits=True).logits[0, 16:]  # [5, vocab]
        top3 = logits.topk(3, dim=-1).indices
        assert bool((top3 == a[row, 17:, None]).any(-1).all())


@pytest.mark.parametrize("name", ["full", "infini", "titans-mac"])
def test_beam_scores_match_a_fresh_stream_of_each_beam(name):
    model, prompt = model_of(name), ids(2, 19, seed=4)
    out = model.generate(prompt, max_new_tokens=5, num_beams=3, num_return_sequences=3, length_penalty=0.0,
                         output_scores=True, return_dict_in_generate=True)  # fmt: skip
    seqs = out.sequences  # [6, 24]
    logp = model.stream(seqs[:, :-1], 7, keep_logits=True).logits.float().log_softmax(-1)[:, 18:]  # [6, 5, vocab]
    recomputed = logp.gather(-1, seqs[:, 19:, None])[..., 0].sum(-1)  # sum of the generated tokens' log-probs
    # 5 log-softmaxes over the vocabulary, each after n_layers blocks; terms of the size of the score
    depth, scale = 5 * model.config.n_layers, float(recomputed.abs().max())
    assert_close(out.sequences_scores, recomputed, dtype=torch.float32, n=259, depth=depth, scale=scale)
    assert not torch.equal(seqs[0], seqs[1])  # three distinct beams per prompt


def test_generation_config_eos_list_and_padding():
    model, prompt = model_of("full"), ids(2, 12, seed=5)
    free = naive_greedy(model, prompt, 6)
    stop = int(free[0, 14])  # row 0's third new token (or an earlier copy of it): an end token
    end = 12 + [int(t) for t in free[0, 12:]].index(stop)
    config = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=[stop, 2], pad_token_id=0)
    out = model.generate(prompt, config)
    assert out.shape == (2, 18)
    assert torch.equal(out[0, : end + 1], free[0, : end + 1]) and bool((out[0, end + 1 :] == 0).all())
    if stop not in free[1, 12:].tolist() and 2 not in free[1, 12:].tolist():
        assert torch.equal(out[1], free[1])

def test_pipeline_text_generation_and_the_saved_generation_config(tmp_path):
    model, tok = model_of("titans-mac"), memzoo.tokenizer()
    generate = pipeline("text-generation", model=model, tokenizer=tok)
    # ByT5 appends </s> unless told not to, and a prompt ending in </s> is a finished text
    text = generate("The key is", max_new_tokens=8, do_sample=False, add_special_tokens=False)[0]["generated_text"]
    prompt = tok("The key is", add_special_tokens=False, return_tensors="pt").input_ids
    expected = tok.decode(naive_greedy(model, prompt, 8)[0], skip_special_tokens=True)
    assert text == expected
    model.generation_config.max_new_tokens = 9
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "generation_config.json").exists()
    assert memzoo.load(tmp_path / "ckpt").generation_config.max_new_tokens == 9


@pytest.mark.parametrize("name", ["full", "titans-mac"])
def test_left_padded_prompts_give_what_each_row_gives_alone(name):
    model, tok = model_of(name), memzoo.tokenizer()
    tok.padding_side = "left"
    texts = ["a longer first prompt", "short", "mid-sized one", "short"]
    batch = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=5, segment_len=4, do_sample=False)
    assert out.shape == (4, batch.input_ids.shape[1] + 5)
    for i, text in enumerate(texts):
        alone = naive_greedy(model, tok([text], add_special_tokens=False, return_tensors="pt").input_ids, 5)
        assert torch.equal(out[i, -alone.shape[1] :], alone[0])
        pads = out.shape[1] - alone.shape[1]
        assert torch.equal(out[i, :pads], batch.input_ids[i, :pads]) and not bool(batch.attention_mask[i, :pads].any())
    sampled = model.generate(**batch, max_new_tokens=3, do_sample=True, num_return_sequences=2)
    assert sampled.shape == (8, batch.input_ids.shape[1] + 3)
    assert torch.equal(sampled[::2, : batch.input_ids.shape[1]], batch.input_ids)  # row-major, as transformers orders them


@pytest.mark.parametrize("call, match", [
    (lambda m, p: m.generate(p, 5), "by name"),
    (lambda m, p: m.generate(p, max_new_tokens=2, generator=torch.Generator()), "manual_seed"),
    (lambda m, p: m.generate(p, max_new_tokens=2, attention_mask=torch.tensor([[1] * 9 + [0]] * 2)), "left padding"),
    (lambda m, p: m.generate(p, max_new_tokens=2, attention_mask=torch.tensor([[0] + [1] * 9] * 2), return_state=True), "token ids only"),
])  # fmt: skip
def test_clear_errors(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call(model_of("full"), ids(2, 10))
