"""Tasks: passkey retrieval, long-gap associative recall and book summarization (data, prompts, scoring)."""

from .booksum import BookExample, BooksumUnavailableError, load_booksum, make_synthetic_book
from .booksum_eval import SUMMARY_PROMPT, evaluate_booksum, evaluate_booksum_hf, make_booksum_training_batch, synthetic_books
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
from .recall import RecallRow, evaluate_recall, make_recall_row, make_recall_training_batch, recall_cell_rows

__all__ = [
    "ANSWER_TEMPLATE",
    "FILLER",
    "INTRO",
    "NEEDLE_TEMPLATE",
    "QUESTION",
    "SUMMARY_PROMPT",
    "BookExample",
    "BooksumUnavailableError",
    "PasskeySample",
    "RecallRow",
    "evaluate_booksum",
    "evaluate_booksum_hf",
    "evaluate_recall",
    "load_booksum",
    "make_booksum_training_batch",
    "make_eval_grid",
    "make_recall_row",
    "make_recall_training_batch",
    "make_sample",
    "make_synthetic_book",
    "make_training_batch",
    "random_key",
    "recall_cell_rows",
    "score",
    "synthetic_books",
]
