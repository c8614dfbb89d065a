"""Summarization metrics: ROUGE-1/2/L F1 and their geometric mean, as SCROLLS reports them.

Reference: Shaham et al., "SCROLLS: Standardized CompaRison Over Long Language Sequences"
(arXiv 2201.03533), the convention the Infini-attention paper (arXiv 2404.07143, Table 3) uses
for BookSum.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

from rouge_score import rouge_scorer

__all__ = ["ROUGE_TYPES", "rouge"]

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@functools.cache
def _scorer() -> rouge_scorer.RougeScorer:
    # Built once: the Porter stemmer setup is the costly part.
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F1 averaged over a dataset, x100, and their geometric mean.

    Scores come from ``rouge_score`` with the Porter stemmer (its tokenizer lowercases and keeps
    ASCII letters and digits only). Each example's F1 is averaged over the dataset first; then
    ``overall = (rouge1 * rouge2 * rougeL) ** (1/3)``, which is 0 when any of the three is.

    Args:
        predictions: generated summaries, one per example.
        references: reference summaries, aligned with ``predictions``.

    Returns:
        ``{"rouge1", "rouge2", "rougeL", "overall"}``, each in [0, 100].

    Raises:
        ValueError: empty inputs, or different lengths.
        TypeError: a prediction or reference that is not a string.
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions and {len(references)} references; "
            "they must be aligned one to one"
        )
    if not predictions:
        raise ValueError("rouge() needs at least one prediction/reference pair")
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for i, (prediction, reference) in enumerate(zip(predictions, references)):
        if not isinstance(prediction, str) or not isinstance(reference, str):
            raise TypeError(
                f"pair {i}: expected strings, got {type(prediction).__name__} and "
                f"{type(reference).__name__}"
            )
        scores = _scorer().score(reference, prediction)  # rouge_score's order: (target, prediction)
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    result = {name: 100.0 * total / len(predictions) for name, total in totals.items()}
    result["overall"] = math.prod(result.values()) ** (1.0 / len(ROUGE_TYPES))
    return result
