"""Tasks: passkey retrieval and book summarization (data, prompts, scoring)."""

from .booksum import BookExample, BooksumUnavailableError, load_booksum, make_synthetic_book
from .passkey import (
    ANSWER_TEMPLATE,
    FILLER,
    INTRO,
    NEEDLE_TEMPLATE,
    QUESTION,
    PasskeySample,
    make_eval_grid,
    make_sample,
    make_training_batch,
    random_key,
    score,
)

__all__ = [
    "ANSWER_TEMPLATE",
    "FILLER",
    "INTRO",
    "NEEDLE_TEMPLATE",
    "QUESTION",
    "BookExample",
    "BooksumUnavailableError",
    "PasskeySample",
    "load_booksum",
    "make_eval_grid",
    "make_sample",
    "make_synthetic_book",
    "make_training_batch",
    "random_key",
    "score",
]
