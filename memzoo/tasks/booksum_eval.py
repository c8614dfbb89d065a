"""Book summarization: prompts, training batches and ROUGE evaluation, for memzoo and transformers models.

One prompt format serves training and evaluation: the book's tokens, then ``prompt`` (default
``"\\n\\nSummary:"``), then the target ``" " + summary`` and EOS. A memzoo model streams the book
through its memory in bounded memory (``model.stream``), then decodes the summary token by token
from that state (``model.generate(prompt, state=...)``); a transformers causal LM does the same
with ``model.generate(..., cache=cache_factory())``, e.g. a bounded
:class:`memzoo.hf.EvictingCache`. Both report ROUGE-1/2/L F1 and their geometric mean
(:func:`memzoo.metrics.rouge`) per book and over all books, and on synthetic books the event
recall (:func:`event_recall`): the share of the book's key events that the summary repeats.

ROUGE of a synthetic summary is high for a summary with every fact wrong: the event sentences share
their template ("In chapter 2, ... the ... at the ..."), so a model that writes the template with
made-up facts shares most of its words with the reference. Event recall is the score that says whether the facts came
from the book; read ROUGE beside it and beside the memory-off control.

Synthetic books for training draw their seeds from ``[2**32, 2**62)`` (see
:func:`make_booksum_training_batch`); evaluation uses seeds below ``2**32``, so held-out books never
share a training book's events.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..metrics import rouge
from ..tokenization import tokenizer as default_tokenizer
from .booksum import BookExample, make_synthetic_book
from .passkey import _as_generator, _byte_offset, _encode

__all__ = [
    "FACT_ROLES",
    "SUMMARY_PROMPT",
    "TRAIN_SEED_RANGE",
    "encode_summary_example",
    "evaluate_booksum",
    "event_recall",
    "evaluate_booksum_hf",
    "fact_positions",
    "make_booksum_batch",
    "make_booksum_training_batch",
    "probe_booksum",
    "synthetic_books",
]

SUMMARY_PROMPT = "\n\nSummary:"
#: Synthetic training books take seeds in this range; evaluation books take seeds below it.
TRAIN_SEED_RANGE = (2**32, 2**62)


def encode_summary_example(book: BookExample, tokenizer: Any, prompt: str = SUMMARY_PROMPT) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of a book + prompt, and of the target that should follow.

    The book and the prompt are encoded separately (a byte tokenizer gives the same ids either
    way; a subword one then cuts exactly where evaluation does).

    Args:
        book: text and reference summary.
        tokenizer: any transformers tokenizer (default in memzoo: ``memzoo.tokenizer()``).
        prompt: text between the book and the summary.

    Returns:
        ``context: [n]`` (book then prompt) and ``target: [m]`` (``" " + summary`` then EOS, when
        the tokenizer has one), int64.
    """
    offset = _byte_offset(tokenizer)
    context = torch.cat([_encode(book.text, tokenizer, offset), _encode(prompt, tokenizer, offset)])
    target = _encode(" " + book.summary, tokenizer, offset)
    if tokenizer.eos_token_id is not None:
        target = torch.cat([target, torch.tensor([tokenizer.eos_token_id])])
    return context, target


def event_recall(prediction: str, events: Sequence[str]) -> float | None:
    """The share of ``events`` (sentences) that appear word for word in ``prediction``; None without events.

    An event counts only whole: its chapter, who, what was done, to which thing and where, in the
    book's words. A summary that names the right person with the wrong object gets nothing for it.
    """
    if not events:
        return None
    return sum(event in prediction for event in events) / len(events)


def synthetic_books(
    n_tokens: int, seeds: Sequence[int], tokenizer: Any = None, n_events: int = 8, n_chapters: int | None = None
) -> list[BookExample]:
    """Held-out synthetic books (:func:`~memzoo.tasks.booksum.make_synthetic_book`), one per seed.

    Raises:
        ValueError: a seed in :data:`TRAIN_SEED_RANGE` (it could be a training book).
    """
    bad = [s for s in seeds if TRAIN_SEED_RANGE[0] <= s < TRAIN_SEED_RANGE[1]]
    if bad:
        raise ValueError(f"seeds {bad} lie in the training range {TRAIN_SEED_RANGE}; evaluate on seeds below {TRAIN_SEED_RANGE[0]}")
    tok = tokenizer or default_tokenizer()
    return [make_synthetic_book(n_tokens, tok, seed, n_events=n_events, n_chapters=n_chapters) for seed in seeds]


def make_booksum_training_batch(
    batch_size: int,
    n_tokens: int,
    tokenizer: Any,
    generator: torch.Generator | int,
    *,
    n_events: int = 8,
    n_chapters: int | None = None,
    prompt: str = SUMMARY_PROMPT,
    summary_weight: float = 1.0,
    other_weight: float = 0.1,
) -> dict[str, torch.Tensor]:
    """A batch of synthetic book + prompt + summary sequences, with labels and loss weights.

    Each row is a fresh synthetic book of at most ``n_tokens`` tokens (seed drawn from
    ``generator`` in :data:`TRAIN_SEED_RANGE`, so the data are a function of the generator),
    followed by the prompt, ``" " + summary`` and EOS. Rows are right-padded to the longest (pad
    id, label -100, weight 0), harmless for a causal model.

    Args:
        batch_size: b.
        n_tokens: the book's length budget (the row adds the prompt and the summary).
        tokenizer: any transformers tokenizer.
        generator: a ``torch.Generator`` or an int seed.
        n_events: key events per book (the summary lists them).
        n_chapters: chapters per book (default ``2 * n_events``).
        prompt: text between book and summary.
        summary_weight: loss weight of predicting the summary tokens (and EOS).
        other_weight: loss weight of every other prediction (the book and the prompt): a small
            language-modelling term that teaches the model to read the filler and events.

    Returns:
        ``input_ids: [b, n]``, ``labels: [b, n]`` in transformers' convention (``labels[:, t]`` is
        the token at t, the model and the trainer shift them; -100 at each row's first position and
        on padding), ``loss_weights: [b, n]`` float32 indexed like ``labels``, and
        ``metric_masks: {"summary": [b, n]}``, the summary's tokens and EOS (the log's ``ce_summary``).
    """
    generator = _as_generator(generator)
    rows = []
    for _ in range(batch_size):
        seed = int(torch.randint(*TRAIN_SEED_RANGE, (1,), generator=generator))
        book = make_synthetic_book(n_tokens, tokenizer, seed, n_events=n_events, n_chapters=n_chapters)
        rows.append(encode_summary_example(book, tokenizer, prompt))
    return _summary_batch(rows, tokenizer, summary_weight, other_weight)


def make_booksum_batch(
    examples: Sequence[BookExample],
    batch_size: int,
    n_tokens: int,
    tokenizer: Any,
    generator: torch.Generator | int,
    *,
    prompt: str = SUMMARY_PROMPT,
    summary_weight: float = 1.0,
    other_weight: float = 0.1,
) -> dict[str, torch.Tensor]:
    """A batch of real texts + prompt + summary (e.g. BookSum chapters from :func:`~memzoo.tasks.booksum.load_booksum`).

    Rows are examples drawn at random (with replacement, from ``generator``). A row longer than
    ``n_tokens`` keeps its summary whole (up to half the row; a longer summary loses its end and its
    EOS) and the text's beginning, so every row fits in ``n_tokens``. Labels and weights as in
    :func:`make_booksum_training_batch`.

    Args:
        examples: texts and reference summaries.
        batch_size: b.
        n_tokens: the longest row (text, prompt, summary and EOS).
        tokenizer / generator / prompt / summary_weight / other_weight: as in :func:`make_booksum_training_batch`.

    Raises:
        ValueError: no examples, or ``n_tokens`` too short for the prompt and some summary.
    """
    if not examples:
        raise ValueError("no examples to train on")
    prompt_len = len(_encode(prompt, tokenizer, _byte_offset(tokenizer)))
    if n_tokens < 2 * prompt_len + 2:
        raise ValueError(f"n_tokens={n_tokens} leaves no room for the text and the summary after a {prompt_len}-token prompt")
    generator = _as_generator(generator)
    rows = []
    for i in torch.randint(len(examples), (batch_size,), generator=generator).tolist():
        context, target = encode_summary_example(examples[i], tokenizer, prompt)
        target = target[: n_tokens // 2]
        keep = min(len(context) - prompt_len, n_tokens - prompt_len - len(target))  # text tokens that fit
        rows.append((torch.cat([context[:keep], context[-prompt_len:]]), target))
    return _summary_batch(rows, tokenizer, summary_weight, other_weight)


def _summary_batch(rows: list[tuple[torch.Tensor, torch.Tensor]], tokenizer: Any, summary_weight: float, other_weight: float) -> dict:
    """Right-padded ``input_ids``, ``labels`` and ``loss_weights`` of (context, target) rows."""
    batch_size, n = len(rows), max(len(c) + len(t) for c, t in rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((batch_size, n), pad_id, dtype=torch.long)
    labels = torch.full((batch_size, n), -100, dtype=torch.long)
    weights = torch.zeros(batch_size, n)
    summary = torch.zeros(batch_size, n, dtype=torch.bool)
    for row, (context, target) in enumerate(rows):
        seq = torch.cat([context, target])
        m, p = len(seq), len(context)
        input_ids[row, :m] = seq
        labels[row, 1:m] = seq[1:]  # transformers' convention: the model shifts them
        weights[row, 1:m] = other_weight
        weights[row, p:m] = summary_weight
        summary[row, p:m] = True
    return {"input_ids": input_ids, "labels": labels, "loss_weights": weights, "metric_masks": {"summary": summary}}


# ----------------------------------------------------------------------------- evaluation


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _budget(max_new_tokens: int | None, target: torch.Tensor) -> int:
    # None: as many tokens as the reference (its EOS included), the usual cap for summaries.
    return len(target) if max_new_tokens is None else max_new_tokens


def _book_result(book: BookExample, n_tokens: int, prediction: str, generated: int, stream_s: float, decode_s: float) -> dict:
    return {
        "id": book.id,
        "n_tokens": n_tokens,
        "prediction": prediction,
        "reference": book.summary,
        **rouge([prediction], [book.summary]),
        "event_recall": event_recall(prediction, book.events),
        "generated_tokens": generated,
        "stream_seconds": round(stream_s, 3),
        "decode_seconds": round(decode_s, 3),
    }


def _summary(name: str, per_book: list[dict], decoding: dict, prompt: str) -> dict:
    stream_s = sum(b["stream_seconds"] for b in per_book)
    decode_s = sum(b["decode_seconds"] for b in per_book)
    recalls = [b["event_recall"] for b in per_book if b["event_recall"] is not None]
    return {
        "model": name,
        "n_books": len(per_book),
        "n_examples": len(per_book),  # the name the docs' tables read
        "books": per_book,
        "rouge": rouge([b["prediction"] for b in per_book], [b["reference"] for b in per_book]),
        "event_recall": sum(recalls) / len(recalls) if recalls else None,  # mean over the books that have events
        "tokens_per_s": round(sum(b["n_tokens"] for b in per_book) / max(stream_s, 1e-9)),
        "decode_tokens_per_s": round(sum(b["generated_tokens"] for b in per_book) / max(decode_s, 1e-9), 1),
        "prompt": prompt,
        "decoding": decoding,
        "peak_rss_mb": round(_peak_rss_mb(), 1),
    }


#: the facts of an event, in the order :func:`fact_positions` gives their spans
FACT_ROLES = ("person", "deed", "adjective", "object", "place")


def fact_positions(book: BookExample) -> list[tuple[int, int]]:
    """Character spans of the facts in ``book.summary``: each event's person, deed, adjective, object and place.

    What is left (``In chapter c,``, ``the``, ``at the``, the full stops) is the template every summary
    shares. Spans are found sentence by sentence from the event's words (synthetic books only).
    """
    spans, start = [], 0
    for event in book.events:
        at = book.summary.index(event, start)
        _, rest = event.split(", ", 1)  # "In chapter c" | "who verb the adj obj at the place."
        who, verb, _the, adj, obj, _at, _the2, place = rest.rstrip(".").split(" ", 7)
        cursor = at + len(event) - len(rest)
        for word in (who, verb, adj, obj, place):
            begin = book.summary.index(word, cursor)
            spans.append((begin, begin + len(word)))
            cursor = begin + len(word)
        start = at + len(event)
    return spans


@torch.no_grad()
def probe_booksum(
    model,
    *,
    lengths: Sequence[int],
    n_books: int = 2,
    n_events: int = 4,
    n_chapters: int | None = None,
    seed: int = 0,
    tokenizer: Any = None,
    segment_len: int = 2048,
    generate: bool = True,
) -> dict:
    """Teacher-forced cross-entropy of a summary's facts and of its template, and event recall, by book length.

    Event recall (greedy decoding) is right or wrong; the facts' cross-entropy moves before it does. It
    is read at each fact word's first token, where the choice is made (the rest of "Tobin" follows
    from its "T"): about ``ln 12`` for a name or a place and ``ln 8`` for a verb, adjective or object
    (~2.2 nats on average) when the model guesses from the template, near 0 when it copies from the
    book. The template's cross-entropy is over every other summary token. Each book streams
    ``segment_len`` tokens per call up to the prompt, then one call reads prompt and reference
    summary. Held-out books (seeds ``seed .. seed + n_books - 1``).

    Args:
        model: a :class:`~memzoo.MemZooForCausalLM`.
        lengths: book lengths in tokens.
        n_books / n_events / n_chapters / seed: the books (:func:`synthetic_books`).
        tokenizer: default ``memzoo.tokenizer()`` (byte level: one character, one token).
        segment_len: tokens per forward call while streaming.
        generate: also decode each summary greedily for its event recall (slower).

    Returns:
        ``{"n_books", "seed", "cells": [{"length", "fact_ce", "template_ce", "fact_ce_by_role", "event_recall"}]}``,
        cross-entropies in nats per token (mean over the books' facts' first tokens / template tokens;
        ``fact_ce_by_role``: the facts' first tokens by :data:`FACT_ROLES`, which shows which facts a model
        copies: the person follows only the chapter's number, the others also the word before them),
        ``event_recall`` None without ``generate``.
    """
    tok = tokenizer or default_tokenizer()
    if _byte_offset(tok) is None:
        raise ValueError("probe_booksum needs a byte-level tokenizer (memzoo.tokenizer()): fact spans are character spans")
    model.eval()
    device = next(model.parameters()).device
    cells = []
    for n in lengths:
        books = synthetic_books(n, range(seed, seed + n_books), tok, n_events=n_events, n_chapters=n_chapters)
        fact_ce, template_ce, recalls = [], [], []
        by_role = {role: [] for role in FACT_ROLES}
        for book in books:
            context, target = (t.to(device) for t in encode_summary_example(book, tok))
            state = model.stream(context[None, :-1], segment_len, state=None).state
            tail = torch.cat([context[-1:], target[:-1]])[None]  # token i predicts target[i]
            ce = torch.nn.functional.cross_entropy(model(tail, state=state).logits[0].float(), target, reduction="none")
            choice, in_fact = torch.zeros(len(target), dtype=torch.bool, device=device), torch.zeros_like(ce, dtype=torch.bool)
            for i, (begin, end) in enumerate(fact_positions(book)):  # the target starts with a space: + 1
                choice[1 + begin] = True
                in_fact[1 + begin : 1 + end] = True
                by_role[FACT_ROLES[i % len(FACT_ROLES)]].append(ce[1 + begin])
            fact_ce.append(ce[choice])
            template_ce.append(ce[~in_fact])
        if generate:
            decoded = evaluate_booksum(model, books, tokenizer=tok, segment_len=segment_len, progress=False)
            recalls = [b["event_recall"] for b in decoded["books"]]
        cells.append({
            "length": n,
            "fact_ce": round(float(torch.cat(fact_ce).mean()), 4),
            "template_ce": round(float(torch.cat(template_ce).mean()), 4),
            "fact_ce_by_role": {role: round(float(torch.stack(v).mean()), 4) for role, v in by_role.items()},
            "event_recall": sum(recalls) / len(recalls) if recalls else None,
        })  # fmt: skip
    return {"n_books": n_books, "seed": seed, "cells": cells}


@torch.no_grad()
def evaluate_booksum(
    model,
    books: Sequence[BookExample],
    *,
    tokenizer: Any = None,
    max_new_tokens: int | None = None,
    do_sample: bool = False,
    temperature: float = 0.5,
    top_p: float = 0.95,
    seed: int = 0,
    segment_len: int = 2048,
    prompt: str = SUMMARY_PROMPT,
    progress: bool = True,
    on_book: Callable[[dict], None] | None = None,
    name: str | None = None,
) -> dict:
    """ROUGE of a memzoo model that streams each book through its memory, then writes the summary.

    Per book: the book is fed ``segment_len`` tokens per call, carrying the state (as
    ``model.stream`` does; bounded memory for every design but ``full``), then
    ``model.generate(prompt, state=...)`` decodes up to
    ``max_new_tokens`` tokens (stopping at EOS), greedily or by nucleus sampling (the
    Infini-attention paper's temperature 0.5, top-p 0.95).

    Args:
        model: a :class:`~memzoo.MemZooForCausalLM` (put in eval mode).
        books: the books and their reference summaries.
        tokenizer: default ``memzoo.tokenizer()``.
        max_new_tokens: decoding budget; None = each reference's length in tokens (EOS included).
        do_sample: sample instead of greedy decoding.
        temperature / top_p: sampling parameters (with ``do_sample``).
        seed: seeds sampling (book i draws with seed + i, leaving the caller's RNG alone).
        segment_len: tokens per forward call while streaming.
        prompt: text between book and summary (the one the model was trained with).
        progress: a progress bar in streamed tokens over all books.
        on_book: called with each finished book's dict (e.g. to save partial results).
        name: the results' ``model`` entry (default: the design, ``model.config.memory``).

    Returns:
        ``{"model", "design", "n_books" (= "n_examples"), "books": [{"id", "n_tokens", "prediction", "reference",
        "rouge1", "rouge2", "rougeL", "overall", "event_recall", "generated_tokens", "stream_seconds",
        "decode_seconds", "state_bytes"}], "rouge": {"rouge1", "rouge2", "rougeL", "overall"}, "event_recall"
        (mean over books; None for books without events, as BookSum's),
        "tokens_per_s" (streaming), "decode_tokens_per_s", "prompt", "decoding", "peak_rss_mb",
        "parameters"}``. ROUGE values are F1 x 100.
    """
    if not books:
        raise ValueError("no books to evaluate")
    if not prompt:
        raise ValueError("prompt must be non-empty: decoding starts from it")
    tok = tokenizer or default_tokenizer()
    model.eval()
    device = next(model.parameters()).device
    encoded = [encode_summary_example(b, tok, prompt) for b in books]
    prompt_len = len(_encode(prompt, tok, _byte_offset(tok)))
    bar = tqdm(total=sum(len(c) for c, _ in encoded), desc="booksum", unit="tok", unit_scale=True, disable=not progress)
    per_book = []
    for i, (book, (context, target)) in enumerate(zip(books, encoded)):
        text_ids, prompt_ids = context[None, :-prompt_len].to(device), context[None, -prompt_len:].to(device)  # [1, n], [1, p]
        start = time.perf_counter()
        state = model.init_state(1, device=device)
        for s in range(0, text_ids.shape[1], segment_len):  # one segment per call, so the bar moves on long books
            state = model(text_ids[:, s : s + segment_len], state=state).state
            bar.update(min(segment_len, text_ids.shape[1] - s))
        stream_s = time.perf_counter() - start
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
            torch.manual_seed(seed + i)  # sampling draws from torch's RNG (as in transformers); one seed per book
            sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}  # greedy: transformers warns of them
            out, final = model.generate(
                prompt_ids, state=state, segment_len=segment_len, max_new_tokens=_budget(max_new_tokens, target),
                do_sample=do_sample, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id, return_state=True, **sampling,
            )  # fmt: skip
        decode_s = time.perf_counter() - start
        new = out[0, prompt_ids.shape[1] :]
        if tok.eos_token_id is not None and bool((new == tok.eos_token_id).any()):
            new = new[: int((new == tok.eos_token_id).nonzero()[0])]  # generate pads with EOS after stopping
        prediction = tok.decode(new, skip_special_tokens=True).strip()
        result = _book_result(book, int(text_ids.shape[1]), prediction, len(new), stream_s, decode_s)
        result["state_bytes"] = final.nbytes()
        per_book.append(result)
        bar.update(prompt_len)
        bar.set_postfix(book=f"{i + 1}/{len(books)}", overall=f"{result['overall']:.1f}")
        if on_book is not None:
            on_book(result)
    bar.close()
    decoding = {"do_sample": do_sample, "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed}
    results = _summary(name or model.config.memory, per_book, decoding, prompt)
    results |= {"design": model.config.memory, "segment_len": segment_len, "parameters": sum(p.numel() for p in model.parameters())}
    return results


@torch.no_grad()
def evaluate_booksum_hf(
    model,
    tokenizer: Any,
    books: Sequence[BookExample],
    *,
    cache_factory: Callable[[], Any] | None = None,
    max_new_tokens: int | None = None,
    do_sample: bool = False,
    temperature: float = 0.5,
    top_p: float = 0.95,
    seed: int = 0,
    prefill_chunk_size: int | None = None,
    prompt: str = SUMMARY_PROMPT,
    progress: bool = True,
    on_book: Callable[[dict], None] | None = None,
    name: str | None = None,
) -> dict:
    """ROUGE of any transformers causal LM, its KV cache made by ``cache_factory`` (e.g. a bounded EvictingCache).

    Per book: ``model.generate(book + prompt, cache=cache_factory(), ...)``. A cache
    whose policy scores tokens by attention (``h2o``, ``namm``) runs inside
    :func:`memzoo.hf.attention_probs`; a cache with an eviction rhythm gets its prompt prefilled
    in chunks of ``evict_every`` tokens (transformers' ``prefill_chunk_size``), so that attention
    never sees more than ``budget + evict_every`` tokens.

    Args:
        model: a transformers causal LM (put in eval mode).
        tokenizer: its tokenizer.
        books: the books and their reference summaries.
        cache_factory: makes a fresh cache per book; None = transformers' default (a full cache).
        max_new_tokens: decoding budget; None = each reference's length in tokens (EOS included).
        do_sample / temperature / top_p: decoding (greedy by default).
        seed: seeds sampling (``torch.manual_seed(seed)`` once, before the first book).
        prefill_chunk_size: prefill chunk; default the cache's ``evict_every`` (else one call).
        prompt / progress / on_book: as in :func:`evaluate_booksum`.
        name: the results' ``model`` entry (default ``f"{model_type}-{cache policy}"``).

    Returns:
        the dict of :func:`evaluate_booksum`, with ``"cache"`` (the cache's repr) instead of
        ``"design"`` and per-book ``"cache_tokens"`` (tokens held by the cache's first layer at the end).
    """
    from contextlib import nullcontext

    if not books:
        raise ValueError("no books to evaluate")
    model.eval()
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    encoded = [encode_summary_example(b, tokenizer, prompt) for b in books]
    bar = tqdm(total=sum(len(c) for c, _ in encoded), desc="booksum", unit="tok", unit_scale=True, disable=not progress)
    per_book, cache_repr = [], "default"
    for i, (book, (context, target)) in enumerate(zip(books, encoded)):
        cache = cache_factory() if cache_factory is not None else None
        cache_repr = repr(cache) if cache is not None else "default"
        hooks = nullcontext()
        if getattr(cache, "needs_attention_probs", False):
            from ..hf import attention_probs  # only when asked: memzoo.hf is an opt-in integration

            hooks = attention_probs(model)
        chunk = prefill_chunk_size or getattr(cache, "evict_every", None)
        if cache is not None:
            from ..hf import generate_cache_kwargs

            kwargs = generate_cache_kwargs(cache)
        else:
            kwargs = {}
        if chunk:
            kwargs["prefill_chunk_size"] = chunk
        if do_sample:
            kwargs |= {"temperature": temperature, "top_p": top_p}
        ids = context[None].to(device)  # [1, n]
        start = time.perf_counter()
        with hooks:
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=_budget(max_new_tokens, target), do_sample=do_sample,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **kwargs,
            )  # fmt: skip
        seconds = time.perf_counter() - start
        new = out[0, ids.shape[1] :]
        if tokenizer.eos_token_id is not None and bool((new == tokenizer.eos_token_id).any()):
            new = new[: int((new == tokenizer.eos_token_id).nonzero()[0])]
        prediction = tokenizer.decode(new, skip_special_tokens=True).strip()
        # transformers' generate times prefill and decoding together: all of it is counted as streaming.
        result = _book_result(book, len(context), prediction, len(new), seconds, 0.0)
        if cache is not None and getattr(cache, "layers", None):
            layer = cache.layers[0]
            result["cache_tokens"] = int(layer.state.length) if hasattr(layer, "state") else int(cache.get_seq_length())
        per_book.append(result)
        bar.update(len(context))
        bar.set_postfix(book=f"{i + 1}/{len(books)}", overall=f"{result['overall']:.1f}")
        if on_book is not None:
            on_book(result)
    bar.close()
    decoding = {"do_sample": do_sample, "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed}
    # EvictingCache's config class names its policy (WindowConfig -> "window"); other caches give their class name.
    label = "dynamic" if cache is None else type(getattr(cache, "config", cache)).__name__.removesuffix("Config").lower()
    results = _summary(name or f"{model.config.model_type}-{label}", per_book, decoding, prompt)
    results |= {"cache": cache_repr, "prefill_chunk_size": chunk, "parameters": sum(p.numel() for p in model.parameters())}
    results["decode_tokens_per_s"] = None  # not measured apart from the prefill (see stream_seconds)
    return results
