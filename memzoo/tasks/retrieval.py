"""Retrieval tasks with a continuous score, for evolving and comparing KV-eviction policies.

A task is a fixed set of prompts, each followed by a short answer that only the context gives
away. The score of a model on a set is the probability it gives the answer, read from one
teacher-forced pass (no generation):

    prob(prompt) = exp(-mean cross-entropy of the prompt's answer tokens)   (a geometric mean over tokens)
    score        = exp(-mean over prompts of that cross-entropy)               (the geometric mean of prob)
    accuracy     = share of prompts whose every answer token is the argmax (= greedy exact match)

The score is a geometric mean so that one prompt the model happens to like does not decide it
(on a weak backbone the probabilities span orders of magnitude); the arithmetic mean is kept too.

A probability keeps moving when exact match does not (a tiny CPU backbone that rarely gets all
five digits right still gives the key more or less probability), so it ranks eviction policies
even on a weak backbone. Two tasks:

- ``passkey``: the Landmark passkey prompt (:func:`memzoo.tasks.passkey.make_sample`) followed by
  a space; the answer is the key's digits.
- ``book``: a synthetic book with one key event (:func:`memzoo.tasks.booksum.make_synthetic_book`,
  "In chapter 2, Mara found the silver key at the lighthouse."), then the question
  ``"\\nQuestion: what did Mara find? Answer: the"``; the answer is ``" silver key"``.

Prompts of a set all have exactly ``n_tokens`` tokens (byte tokenizer), so a set runs as one batch.
Dimension letters: b batch (prompts), n prompt length, a answer length (see ``memzoo/interface.py``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..tokenization import tokenizer as default_tokenizer
from .booksum import make_synthetic_book
from .passkey import _byte_offset, _encode, make_sample, random_key

__all__ = ["TASKS", "RetrievalSet", "book_set", "make_task", "passkey_set", "score_answers"]

_EVENT = re.compile(r"In chapter (\d+), (\w+) (\w+) the (\w+) (\w+) at the ([^.]+)\.")


@dataclass
class RetrievalSet:
    """A batch of equally long prompts and their answers.

    Attributes:
        name: the task's name.
        prompts: [b, n] token ids.
        answers: [b, a] token ids of the answers, right-padded with 0.
        answer_mask: [b, a] True on real answer tokens.
        texts: the answers as text (for reports).
    """

    name: str
    prompts: Tensor
    answers: Tensor
    answer_mask: Tensor
    texts: list[str]


def _stack(name: str, prompts: list[Tensor], answers: list[Tensor], texts: list[str]) -> RetrievalSet:
    a = max(len(x) for x in answers)
    padded = torch.zeros(len(answers), a, dtype=torch.long)
    mask = torch.zeros(len(answers), a, dtype=torch.bool)
    for i, x in enumerate(answers):
        padded[i, : len(x)], mask[i, : len(x)] = x, True
    return RetrievalSet(name, torch.stack(prompts), padded, mask, texts)


def passkey_set(
    n_prompts: int, n_tokens: int, seed: int, tokenizer: Any = None, depths: tuple[float, float] = (0.05, 0.75)
) -> RetrievalSet:
    """Passkey prompts of ``n_tokens`` tokens (the trailing space included); answers are the key's digits.

    Args:
        n_prompts: b.
        n_tokens: n, prompt length in tokens (a byte tokenizer gives it exactly).
        seed: draws keys and needle depths.
        tokenizer: default ``memzoo.tokenizer()``; must be byte level.
        depths: needle depths are spread evenly over this range. The default stops at 0.75 so that the
            needle is out of a recent window of a few hundred tokens at 1K: a prompt that any window
            answers tells nothing about an eviction policy.
    """
    tok = tokenizer or default_tokenizer()
    offset = _byte_offset(tok)
    if offset is None:
        raise ValueError("retrieval sets need a byte-level tokenizer (memzoo.tokenizer()): prompts must have equal lengths")
    generator = torch.Generator().manual_seed(seed)
    lo, hi = depths
    prompts, answers, texts = [], [], []
    for i in range(n_prompts):
        key = random_key(generator)
        depth = lo + (hi - lo) * (i + 0.5) / n_prompts
        sample = make_sample(n_tokens - 1, depth, key, tok)
        prompts.append(torch.cat([sample.input_ids, _encode(" ", tok, offset)]))
        answers.append(_encode(str(key), tok, offset))
        texts.append(str(key))
    return _stack("passkey", prompts, answers, texts)


def book_set(n_prompts: int, n_tokens: int, seed: int, tokenizer: Any = None) -> RetrievalSet:
    """Synthetic-book prompts of ``n_tokens`` tokens asking what the book's one key event was about.

    Each book (``make_synthetic_book`` with one event) is cut from the left to fit ``n_tokens`` with the
    question; a book whose event the cut would remove is skipped (the next seed is tried).

    Args:
        n_prompts: b.
        n_tokens: n.
        seed: the first book seed.
        tokenizer: default ``memzoo.tokenizer()``; must be byte level.
    """
    tok = tokenizer or default_tokenizer()
    offset = _byte_offset(tok)
    if offset is None:
        raise ValueError("retrieval sets need a byte-level tokenizer (memzoo.tokenizer()): prompts must have equal lengths")
    prompts, answers, texts = [], [], []
    book_seed = seed
    while len(prompts) < n_prompts:
        book = make_synthetic_book(n_tokens + 256, tok, seed=book_seed, n_events=1, n_chapters=3)
        book_seed += 1
        match = _EVENT.search(book.summary)
        _, who, verb, adj, obj, _ = match.groups()
        question = f"\nQuestion: what did {who} {verb}? Answer: the"
        keep = n_tokens - len(question)
        start = len(book.text) - keep
        if start < 0 or book.text.find(match.group(0)) < start:  # too short, or the cut would remove the event
            continue
        prompts.append(_encode(book.text[start:] + question, tok, offset))
        answers.append(_encode(f" {adj} {obj}", tok, offset))
        texts.append(f"{adj} {obj}")
    return _stack("book", prompts, answers, texts)


TASKS = {"passkey": passkey_set, "book": book_set}


def make_task(name: str, n_prompts: int, n_tokens: int, seed: int, tokenizer: Any = None) -> RetrievalSet:
    """The retrieval set of task ``name`` (``passkey`` or ``book``)."""
    if name not in TASKS:
        raise ValueError(f"unknown retrieval task {name!r}; available: {', '.join(TASKS)}")
    return TASKS[name](n_prompts, n_tokens, seed, tokenizer)


@torch.no_grad()
def score_answers(model, task: RetrievalSet, segment_len: int = 512) -> dict:
    """Answer probability and exact match of ``model`` on a retrieval set (one teacher-forced pass).

    The prompt but its last token is streamed (``model.stream``, the memory evicts as it goes), then one
    call reads the last prompt token and the answer: the logits that predict each answer token.

    Args:
        model: a :class:`~memzoo.MemZooForCausalLM`.
        task: a :class:`RetrievalSet`.
        segment_len: tokens per forward call while streaming (results do not depend on it).

    Returns:
        ``{"score": exp(-mean CE), "prob": mean answer probability, "accuracy": exact-match share,
        "mean_ce", "probs": per prompt, "correct": per prompt}``.
    """
    model.eval()
    device = next(model.parameters()).device
    prompts, answers, mask = task.prompts.to(device), task.answers.to(device), task.answer_mask.to(device)
    state = model.stream(prompts[:, :-1], segment_len, state=None).state
    tail = torch.cat([prompts[:, -1:], answers[:, :-1]], dim=1)  # [b, a]: token t predicts answers[:, t]
    logits = model(tail, state=state).logits.float()  # [b, a, vocab]
    ce = F.cross_entropy(logits.transpose(1, 2), answers, reduction="none")  # [b, a]
    mean_ce = (ce * mask).sum(1) / mask.sum(1)
    probs = torch.exp(-mean_ce)
    correct = ((logits.argmax(-1) == answers) | ~mask).all(1)
    return {
        "score": math.exp(-float(mean_ce.mean())),
        "prob": float(probs.mean()),
        "accuracy": float(correct.float().mean()),
        "mean_ce": float(mean_ce.mean()),
        "probs": [float(p) for p in probs.tolist()],
        "correct": [bool(c) for c in correct.tolist()],
    }
