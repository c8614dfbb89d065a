"""ROUGE against values counted by hand (rouge_score tokenizes lowercase words, Porter stemmer)."""

import math

import pytest

from memzoo.metrics import rouge


def f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall)


def test_rouge_matches_hand_counts_and_averages_over_the_dataset():
    predictions = ["The cat sat on the mat.", "dogs run"]
    references = ["the cat lay on the mat", "A dog runs"]
    # Pair 1: 5 of 6 unigrams shared (the x2, cat, on, mat), 3 of 5 bigrams (the cat, on the,
    # the mat), longest common subsequence "the cat on the mat" = 5 of 6.
    # Pair 2, after stemming dogs -> dog, runs -> run: [dog, run] vs [a, dog, run].
    r1 = (5 / 6 + f1(1, 2 / 3)) / 2 * 100
    r2 = (3 / 5 + f1(1, 1 / 2)) / 2 * 100
    rl = (5 / 6 + f1(1, 2 / 3)) / 2 * 100
    scores = rouge(predictions, references)
    assert set(scores) == {"rouge1", "rouge2", "rougeL", "overall"}
    assert scores["rouge1"] == pytest.approx(r1)
    assert scores["rouge2"] == pytest.approx(r2)
    assert scores["rougeL"] == pytest.approx(rl)
    assert scores["overall"] == pytest.approx((r1 * r2 * rl) ** (1 / 3))


def test_identical_texts_score_100_and_disjoint_texts_0():
    assert rouge(["one two three"], ["One, two, three!"]) == pytest.approx(
        dict(rouge1=100.0, rouge2=100.0, rougeL=100.0, overall=100.0)
    )
    assert rouge(["alpha beta"], ["gamma delta"]) == dict(rouge1=0.0, rouge2=0.0, rougeL=0.0, overall=0.0)


def test_overall_is_zero_when_any_component_is():
    # Same words, opposite order: every unigram matches, no bigram does, LCS is one word.
    scores = rouge(["cat dog"], ["dog cat"])
    assert scores["rouge1"] == pytest.approx(100.0)
    assert scores["rouge2"] == 0.0
    assert scores["rougeL"] == pytest.approx(50.0)
    assert scores["overall"] == 0.0 and not math.isnan(scores["overall"])


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="2 predictions and 1 references"):
        rouge(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="at least one"):
        rouge([], [])
    with pytest.raises(TypeError, match="pair 0"):
        rouge([None], ["a"])
