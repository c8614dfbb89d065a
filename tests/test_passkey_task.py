"""Passkey task: the Landmark template, exact lengths, spans, scoring, grids and training batches."""

import math
import time

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tolerance import rounding

from memzoo.tasks import passkey
from memzoo.tasks.passkey import make_eval_grid, make_sample, make_training_batch, random_key, score

# Typed out again (not imported) so a typo in the module's constants fails here.
LANDMARK_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "them. I will quiz you about the important information there."
)
LANDMARK_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
LANDMARK_QUESTION = "What is the pass key? The pass key is"


@pytest.fixture(scope="module")
def tok():
    return transformers.ByT5Tokenizer(extra_ids=0)


@pytest.fixture(scope="module")
def bpe_tok():
    """A small byte-level BPE (a subword tokenizer, not one token per character), built offline."""
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    model.train_from_iterator([LANDMARK_INTRO, LANDMARK_FILLER * 20, LANDMARK_QUESTION], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=model, pad_token="<pad>")


def min_length(key: int) -> int:
    """Characters (= byte tokens) of a prompt without filler: 4 newlines join the 5 parts."""
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    return len(LANDMARK_INTRO) + len(needle) + len(LANDMARK_QUESTION) + 4


def test_prompt_is_the_landmark_template(tok):
    sample = make_sample(700, 0.5, 12345, tok)
    intro, before, needle, after, question = sample.prompt.split("\n")
    assert intro == LANDMARK_INTRO
    assert needle == "The pass key is 12345. Remember it. 12345 is the pass key."
    assert question == LANDMARK_QUESTION
    stream = " ".join([LANDMARK_FILLER] * 10)
    # Both filler parts are prefixes of the same stream, cut per character (here mid-sentence).
    assert stream.startswith(before) and stream.startswith(after)
    assert not before.endswith(".") and abs(len(before) - len(after)) <= 1
    assert sample.answer == " 12345." and sample.key == 12345 and sample.depth == 0.5


@pytest.mark.parametrize("depth", [0.0, 0.29, 1.0])  # int(0.29 * 100) == 28, round gives 29
@pytest.mark.parametrize("extra", [0, 1, 100, 3000])
def test_byte_prompt_has_exact_length_and_tokenizer_ids(tok, depth, extra):
    n = min_length(4242) + extra
    sample = make_sample(n, depth, 4242, tok)
    assert sample.input_ids.dtype == torch.long and sample.input_ids.shape == (n,)
    assert sample.input_ids.tolist() == tok.encode(sample.prompt, add_special_tokens=False)
    before, after = sample.prompt.split("\n")[1], sample.prompt.split("\n")[3]
    assert len(before) == round(depth * extra) and len(after) == extra - len(before)


def test_depth_extremes_put_the_needle_next_to_intro_or_question(tok):
    first = make_sample(800, 0.0, 777, tok).prompt
    last = make_sample(800, 1.0, 777, tok).prompt
    assert first.startswith(LANDMARK_INTRO + "\n\nThe pass key is 777.")
    assert last.endswith("777 is the pass key.\n\n" + LANDMARK_QUESTION)


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_spans_point_at_the_needle_and_the_key_copy(tok, depth):
    sample = make_sample(1000, depth, 90210, tok)
    needle = tok.decode(sample.input_ids[slice(*sample.needle_span)])
    assert needle == "The pass key is 90210. Remember it. 90210 is the pass key."
    copy_start, copy_end = sample.key_copy_span
    assert tok.decode(sample.input_ids[copy_start:copy_end]) == "90210"
    # The second copy, not the first: "Remember it. " comes right before it.
    assert tok.decode(sample.input_ids[copy_start - 13 : copy_start]) == "Remember it. "


def test_errors_say_what_is_wrong(tok):
    with pytest.raises(ValueError, match=f"too small.*take {min_length(12345)} tokens"):
        make_sample(min_length(12345) - 1, 0.5, 12345, tok)
    for depth in (-0.1, 1.01, math.nan):
        with pytest.raises(ValueError, match="depth must be in"):
            make_sample(1000, depth, 12345, tok)
    for key in (-1, 1.5, "12345", True):
        with pytest.raises(ValueError, match="non-negative int"):
            make_sample(1000, 0.5, key, tok)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" 12345.", True),
        ("12345", True),
        (" is 12345 and then 999", True),
        ("012345", True),  # compared as integers
        ("", False),
        ("no digits at all", False),
        ("123456", False),
        ("1234", False),
        (" 54321 12345", False),  # only the first integer counts
        ("12,345", False),
        ("x12345y", True),
    ],
)
def test_score_compares_the_first_integer(text, expected):
    assert score(text, 12345) is expected


def test_random_key_has_the_digits_and_follows_the_seed():
    keys = [random_key(torch.Generator().manual_seed(s)) for s in range(50)]
    assert all(10_000 <= k <= 99_999 for k in keys) and len(set(keys)) > 40
    assert random_key(3) == random_key(torch.Generator().manual_seed(3))
    assert all(0 <= random_key(s, digits=1) <= 9 for s in range(20))
    with pytest.raises(ValueError, match="digits"):
        random_key(0, digits=0)


def test_eval_grid_is_deterministic_and_pairs_keys_across_cells(tok):
    grid = list(make_eval_grid([300, 500], [0.0, 1.0], 3, tok, seed=7))
    assert [(n, d) for n, d, _ in grid] == [(300, 0.0), (300, 1.0), (500, 0.0), (500, 1.0)]
    keys = [s.key for s in grid[0][2]]
    for n, depth, samples in grid:
        assert [s.key for s in samples] == keys
        assert all(len(s.input_ids) == n and s.depth == depth for s in samples)
    again = list(make_eval_grid([300, 500], [0.0, 1.0], 3, tok, seed=7))
    assert [[s.prompt for s in c[2]] for c in again] == [[s.prompt for s in c[2]] for c in grid]
    other = next(iter(make_eval_grid([300], [0.0], 3, tok, seed=8)))
    assert [s.key for s in other[2]] != keys


def test_training_batch_labels_follow_transformers_and_weights_follow_findings(tok):
    batch = make_training_batch(4, 400, tok, generator=0)
    ids, labels, weights = batch["input_ids"], batch["labels"], batch["loss_weights"]
    assert ids.shape == labels.shape == weights.shape == (4, 400)
    assert ids.dtype == labels.dtype == torch.long and weights.dtype == torch.float32
    # transformers' convention: labels[:, t] is the token at t (nothing predicts token 0)
    assert torch.equal(labels[:, 1:], ids[:, 1:]) and (labels[:, 0] == -100).all()
    assert (weights[:, 0] == 0).all()
    for row in range(4):
        text = tok.decode(ids[row])
        prompt, answer = text[:-7], text[-7:]
        key = answer.strip(" .")
        assert prompt.endswith(LANDMARK_QUESTION) and answer == f" {key}." and score(answer, int(key))
        # The logged metrics: the answer's digits and the needle's key copy, as masks indexed like the labels.
        masks = batch["metric_masks"]
        assert tok.decode(labels[row][masks["answer"][row]]) == key
        assert tok.decode(labels[row][masks["copy"][row]]) == key
        # Group weights (an early prototype's recipe): 1 on the key copy, 1 on the answer (space + digits + full
        # stop), 0.2 on the rest, each spread evenly over its group's tokens.
        copy, w = masks["copy"][row], weights[row]
        answer = torch.zeros_like(copy)
        answer[-7:] = True  # " " + 5 digits + "."
        assert tok.decode(labels[row][answer]) == f" {key}."
        rest = ~(copy | answer)
        rest[0] = False
        # exact by construction: each weight is one IEEE division (group weight / group size), the
        # same on every machine; allclose's default only absorbs the fp32 rounding of 1/5 and 1/7
        assert torch.allclose(w[copy], torch.tensor(1.0 / 5)) and torch.allclose(w[answer], torch.tensor(1.0 / 7))
        assert torch.allclose(w[rest], 0.2 / rest.sum().float())
        assert w.sum().item() == pytest.approx(2.2, rel=rounding(n=w.numel()))  # an fp32 sum of 400 weights
        # The needle sentence's span, for analyses (which of its tokens a cache still holds).
        start, end = batch["needle_spans"][row].tolist()
        assert tok.decode(ids[row, start:end]) == f"The pass key is {key}. Remember it. {key} is the pass key."


def test_training_batch_options(tok):
    a = make_training_batch(3, 300, tok, generator=torch.Generator().manual_seed(5))
    b = make_training_batch(3, 300, tok, generator=5)
    assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "labels", "loss_weights"))
    assert all(torch.equal(a["metric_masks"][k], b["metric_masks"][k]) for k in ("answer", "copy"))
    near = make_training_batch(3, 300, tok, generator=5, needle_near_end_prob=1.0)
    fixed = make_training_batch(3, 300, tok, generator=5, depth=0.0)
    for row in range(3):
        assert "pass key.\n\n" + LANDMARK_QUESTION in tok.decode(near["input_ids"][row])
        assert LANDMARK_INTRO + "\n\nThe pass key" in tok.decode(fixed["input_ids"][row])
    custom = make_training_batch(1, 300, tok, generator=5, answer_weight=3.0, copy_weight=2.0, other_weight=0.0)
    w = custom["loss_weights"][0]
    # exact fractions (one division each); the defaults only absorb their fp32 rounding
    assert sorted(set(w.tolist())) == pytest.approx([0.0, 2.0 / 5, 3.0 / 7])
    assert torch.isclose(w, torch.tensor(3.0 / 7)).sum() == 7 and torch.isclose(w, torch.tensor(2.0 / 5)).sum() == 5
    # A group's weight does not depend on the prompt length: the answer keeps its share.
    longer = make_training_batch(1, 900, tok, generator=5)["loss_weights"][0]
    assert longer.sum().item() == pytest.approx(2.2, rel=rounding(n=longer.numel()))  # fp32 sums of 900 and 7 weights
    assert longer[-7:].sum().item() == pytest.approx(1.0, rel=rounding(n=7))
    with pytest.raises(ValueError, match="answer.*too small"):
        make_training_batch(1, min_length(12345), tok, generator=0)


def test_subword_tokenizer_gets_as_close_as_possible(bpe_tok):
    for n in (150, 333, 2000):
        sample = make_sample(n, 0.5, 31337, bpe_tok)
        assert n - 3 <= len(sample.input_ids) <= n
        assert sample.input_ids.tolist() == bpe_tok.encode(sample.prompt, add_special_tokens=False)
        assert "31337" in bpe_tok.decode(sample.input_ids[slice(*sample.key_copy_span)])
        assert "Remember it" in bpe_tok.decode(sample.input_ids[slice(*sample.needle_span)])
    batch = make_training_batch(2, 500, bpe_tok, generator=1)
    assert batch["input_ids"].shape == (2, 500)
    pad = batch["input_ids"] == bpe_tok.pad_token_id
    assert (batch["labels"][pad] == -100).all() and (batch["loss_weights"][pad] == 0).all()


def test_million_token_prompt_is_fast(tok):
    start = time.perf_counter()
    sample = make_sample(1_000_000, 0.25, 12345, tok)
    elapsed = time.perf_counter() - start
    assert sample.input_ids.shape == (1_000_000,)
    copy_start, copy_end = sample.key_copy_span
    assert (sample.input_ids[copy_start:copy_end] - 3).tolist() == list(b"12345")
    assert elapsed < 2.0, f"1M-token prompt took {elapsed:.2f} s"


def test_module_constants_match_landmark():
    assert passkey.INTRO == LANDMARK_INTRO
    assert passkey.FILLER == LANDMARK_FILLER
    assert passkey.QUESTION == LANDMARK_QUESTION
