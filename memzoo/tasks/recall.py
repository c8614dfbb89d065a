"""Long-gap multi-query associative recall (MQAR over long gaps): the data, training batches, and scoring.

The Zoology task (Arora et al. 2023, arXiv 2312.04927, "multi-query associative recall"), with
multi-byte keys and values and a filler gap between the pairs and the queries, as in ARMT
(Rodkin et al. 2024, arXiv 2407.04841): the memory has to carry ``k`` facts across ``G`` tokens
and give back the one each query asks for. A row reads::

    <filler>Pairs: qz=80 bk=31 ... <filler: the gap, G tokens>Recall: bk=31 qz=80 ...

Each pair item is ``key + "=" + value + " "`` (lowercase-letter keys, distinct in a row; digit
values). The queries are the row's keys in random order, each followed by its value; a query is
answered when every value character is the model's argmax given the row up to it (teacher forced,
as in Zoology: the previous queries' true values are in the context). Chance is
``10 ** -value_len`` per query, ``ln 10`` nats per value digit.

**Overwrite variant**: an ``Update: `` block inside the gap (at ``update_at`` of it) gives
``max(1, k // 4)`` of the keys new values; queries ask for the latest. A design that only adds
to its memory (the paper's linear Infini rule) mixes the two values; one that overwrites (a
delta rule, a cache that keeps the newer tokens) does not.

**Gap** ``G``: the tokens between the pairs block and the query block (the update block, when there
is one, inside it). A filler is a prefix of the passkey ``FILLER`` stream, so a cached or compressed
design sees the same kind of distractor as in passkey retrieval.

Rows of one evaluation cell (a gap and a variant) hold every ``k`` side by side: a row with fewer
pairs starts with filler, so that every row's pairs block ends, and its query block starts, at the
same position, and the rows stream as one batch; the query blocks are padded after their end with
filler that is not scored. Byte-level tokenizer only (``memzoo.tokenizer()``): one token per
character, so lengths are exact.

Dimension letters: b batch (rows), n length (see ``memzoo/interface.py``).
"""

from __future__ import annotations

import math
import string
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..tokenization import tokenizer as default_tokenizer
from .passkey import _byte_offset, _encode, _filler

__all__ = [
    "KEY_LEN",
    "PAIRS_HEADER",
    "QUERY_HEADER",
    "UPDATE_HEADER",
    "VALUE_LEN",
    "RecallRow",
    "evaluate_recall",
    "make_recall_row",
    "make_recall_training_batch",
    "recall_cell_rows",
]

PAIRS_HEADER = "Pairs: "
UPDATE_HEADER = "Update: "
QUERY_HEADER = "Recall: "

KEY_ALPHABET = string.ascii_lowercase
VALUE_ALPHABET = string.digits
#: characters per key and per value. Two each: a 3-layer backbone warm-started from passkey learned one
#: pair with 3-letter keys and 3-digit values in 700 steps but not yet four (2.3 -> 1.9 nats per digit)
KEY_LEN = 2
VALUE_LEN = 2


@dataclass
class RecallRow:
    """One recall row as text, with the character spans scoring needs.

    Attributes:
        text: the row.
        k: pairs written.
        gap: tokens between the pairs block and the query block.
        pairs: ``{key: value}`` as first written.
        answers: ``{key: value}`` the queries ask for (the updated value for an overwritten key).
        updated: the keys the update block reassigned (empty without one).
        value_spans: per query in order, ``(key, start, end)``: the value's characters in ``text``.
        query_start: index of the query block's first character (``Recall: ``).
    """

    text: str
    k: int
    gap: int
    pairs: dict[str, str]
    answers: dict[str, str]
    updated: list[str]
    value_spans: list[tuple[str, int, int]]
    query_start: int


def item_len(key_len: int, value_len: int) -> int:
    """Characters of one pair item ``key=value `` ."""
    return key_len + 1 + value_len + 1


def _draw(alphabet: str, n: int, generator: torch.Generator) -> str:
    idx = torch.randint(len(alphabet), (n,), generator=generator).tolist()
    return "".join(alphabet[i] for i in idx)


def _draw_pairs(k: int, key_len: int, value_len: int, generator: torch.Generator) -> dict[str, str]:
    if k > len(KEY_ALPHABET) ** key_len // 2:
        raise ValueError(f"k={k} pairs need more distinct keys than {key_len} letters give comfortably: raise key_len")
    pairs: dict[str, str] = {}
    while len(pairs) < k:
        key = _draw(KEY_ALPHABET, key_len, generator)
        if key not in pairs:
            pairs[key] = _draw(VALUE_ALPHABET, value_len, generator)
    return pairs


def _items(pairs: dict[str, str], order: Sequence[str]) -> str:
    return "".join(f"{key}={pairs[key]} " for key in order)


def make_recall_row(
    k: int,
    gap: int,
    generator: torch.Generator,
    *,
    lead: int = 0,
    n_updates: int = 0,
    update_at: float = 0.5,
    key_len: int = KEY_LEN,
    value_len: int = VALUE_LEN,
) -> RecallRow:
    """One row: ``lead`` filler characters, ``k`` pairs, a gap of ``gap`` tokens, ``k`` queries.

    Args:
        k: pairs (and queries), >= 1.
        gap: tokens between the pairs block and the query block, >= the update block's length.
        generator: draws the keys, values, query order and updates.
        lead: filler characters before the pairs block.
        n_updates: keys the update block reassigns (0 = no update block), at most ``k``.
        update_at: where the update block starts, as a fraction of the gap's filler.
        key_len / value_len: characters per key (letters) / value (digits).
    """
    if k < 1 or gap < 0 or lead < 0:
        raise ValueError(f"need k >= 1 pairs, gap >= 0 and lead >= 0 tokens; got k={k}, gap={gap}, lead={lead}")
    if not 0 <= n_updates <= k:
        raise ValueError(f"n_updates must be in [0, k={k}], got {n_updates}")
    if not 0.0 <= update_at <= 1.0:
        raise ValueError(f"update_at is a fraction of the gap in [0, 1], got {update_at}")
    pairs = _draw_pairs(k, key_len, value_len, generator)
    keys = list(pairs)
    answers = dict(pairs)
    updated: list[str] = []
    update_block = ""
    if n_updates:
        chosen = torch.randperm(k, generator=generator)[:n_updates].tolist()
        updated = [keys[i] for i in sorted(chosen)]
        for key in updated:
            new = pairs[key]
            while new == pairs[key]:  # an update that repeats the old value would test nothing
                new = _draw(VALUE_ALPHABET, value_len, generator)
            answers[key] = new
        update_block = UPDATE_HEADER + _items(answers, updated)
    filler = gap - len(update_block)
    if filler < 0:
        raise ValueError(f"gap={gap} is shorter than the update block ({len(update_block)} tokens): use a longer gap")
    before = round(filler * update_at) if update_block else filler
    order = [keys[i] for i in torch.randperm(k, generator=generator).tolist()]
    head = _filler(lead) + PAIRS_HEADER + _items(pairs, keys)
    # the gap: filler, the update block (if any), filler; the second part continues the filler stream
    stream = _filler(filler)
    gap_text = stream[:before] + update_block + stream[before:]
    query_start = len(head) + len(gap_text)
    text = head + gap_text + QUERY_HEADER + _items(answers, order)
    spans = []
    pos = query_start + len(QUERY_HEADER)
    for key in order:
        start = pos + key_len + 1
        spans.append((key, start, start + value_len))
        pos += item_len(key_len, value_len)
    return RecallRow(text, k, gap, pairs, answers, updated, spans, query_start)


def _check_byte_tokenizer(tok: Any) -> int:
    offset = _byte_offset(tok)
    if offset is None:
        raise ValueError("recall rows need a byte-level tokenizer (memzoo.tokenizer()): rows of a batch must have equal lengths")
    return offset


def _n_updates(k: int) -> int:
    return max(1, k // 4)


def make_recall_training_batch(
    batch_size: int,
    n_tokens: int,
    tokenizer: Any,
    generator: torch.Generator | int,
    *,
    ks: Sequence[int] = (1, 4, 16, 64),
    overwrite_prob: float = 0.25,
    key_len: int = KEY_LEN,
    value_len: int = VALUE_LEN,
    answer_weight: float = 1.0,
    other_weight: float = 0.2,
) -> dict[str, Any]:
    """A batch of recall rows of exactly ``n_tokens`` tokens, labels and per-token loss weights.

    Each row draws ``k`` from the ``ks`` that fit, splits its free tokens uniformly into a lead and
    a gap, and with probability ``overwrite_prob`` has an update block in the gap. The row ends with
    its last query's value. Weights as in passkey training: the queried values as one group
    (``answer_weight``), every other prediction as another (``other_weight``), each spread evenly
    over its tokens, so the answers keep their share of the loss at any length.

    Returns:
        ``input_ids, labels, loss_weights: [b, n]`` (transformers labels, -100 at position 0) and
        ``metric_masks: {"answer": [b, n]}``, the queried value tokens (the log's ``ce_answer``;
        ln 10 = 2.30 nats per digit is chance).
    """
    if not 0.0 <= overwrite_prob <= 1.0:
        raise ValueError(f"overwrite_prob must be in [0, 1], got {overwrite_prob}")
    offset = _check_byte_tokenizer(tokenizer)
    g = generator if isinstance(generator, torch.Generator) else torch.Generator().manual_seed(int(generator))
    step = item_len(key_len, value_len)

    def fixed(k: int, updates: int) -> int:
        return len(PAIRS_HEADER) + len(QUERY_HEADER) + 2 * k * step + (len(UPDATE_HEADER) + updates * step if updates else 0)

    fits = [k for k in ks if fixed(k, _n_updates(k)) <= n_tokens]
    if not fits:
        raise ValueError(f"n_tokens={n_tokens} holds none of ks={list(ks)} (k pairs take about {2 * step} k tokens): "
                         "use longer rows or smaller k")  # fmt: skip
    input_ids = torch.zeros(batch_size, n_tokens, dtype=torch.long)
    answer = torch.zeros(batch_size, n_tokens, dtype=torch.bool)
    for row in range(batch_size):
        k = fits[int(torch.randint(len(fits), (1,), generator=g))]
        overwrite, split = torch.rand(2, generator=g).tolist()
        updates = _n_updates(k) if overwrite < overwrite_prob else 0
        free = n_tokens - fixed(k, updates)
        gap = round(free * split)
        update_len = len(UPDATE_HEADER) + updates * step if updates else 0
        r = make_recall_row(k, gap + update_len, g, lead=free - gap, n_updates=updates, update_at=float(torch.rand(1, generator=g)),
                            key_len=key_len, value_len=value_len)  # fmt: skip
        input_ids[row] = _encode(r.text, tokenizer, offset)
        for _, start, end in r.value_spans:
            answer[row, start:end] = True
    labels = input_ids.clone()
    labels[:, 0] = -100
    other = torch.ones_like(answer)
    other[:, 0] = False
    other &= ~answer
    weights = answer * (answer_weight / answer.sum(1, keepdim=True)) + other * (other_weight / other.sum(1, keepdim=True))
    return {"input_ids": input_ids, "labels": labels, "loss_weights": weights.float(), "metric_masks": {"answer": answer}}


def recall_cell_rows(
    gap: int,
    ks: Sequence[int],
    seed: int,
    *,
    overwrite: bool = False,
    min_queries: int = 8,
    key_len: int = KEY_LEN,
    value_len: int = VALUE_LEN,
) -> list[RecallRow]:
    """The rows of one evaluation cell: for each ``k``, ``ceil(min_queries / k)`` rows, aligned.

    A row with fewer pairs gets a longer lead, so every row's pairs block ends (and its queries
    start) at the same position. The same ``seed`` gives the same pairs at every gap (a paired
    comparison across gaps).
    """
    step = item_len(key_len, value_len)
    longest = max(ks)
    rows = []
    generator = torch.Generator().manual_seed(seed)
    for k in ks:
        for _ in range(math.ceil(min_queries / k)):
            rows.append(make_recall_row(k, gap, generator, lead=(longest - k) * step, n_updates=_n_updates(k) if overwrite else 0,
                                        key_len=key_len, value_len=value_len))  # fmt: skip
    return rows


@torch.no_grad()
def _score_cell(
    model, rows: list[RecallRow], tok: Any, segment_len: int, progress: bool = False
) -> tuple[list[list[bool]], list[list[float]], Any]:
    """Streams the rows' common prefix (up to the query block; ``progress``: a bar over its tokens), then reads
    every query block in one call.

    Returns per row: each query's correctness, each query's mean value cross-entropy; and the state
    after the prefix.
    """
    offset = _check_byte_tokenizer(tok)
    device = next(model.parameters()).device
    start = rows[0].query_start
    if any(r.query_start != start for r in rows):
        raise RuntimeError("recall rows of one cell must have their query blocks at one position")
    tail = max(len(r.text) for r in rows) - start
    ids = torch.stack([_encode(r.text + _filler(start + tail - len(r.text)), tok, offset) for r in rows]).to(device)  # [b, n]
    state = model.init_state(len(rows), device=device)
    # the prefix but its last token, which is read with the queries: its logits predict the block's first token
    if start > 1:
        state = model.stream(ids[:, : start - 1], segment_len, state=state, progress=progress).state
    logits = model(ids[:, start - 1 : -1], state=state).logits.float()  # [b, tail, vocab]: position t predicts ids[:, start + t]
    targets = ids[:, start:]
    ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # [b, tail]
    right = logits.argmax(-1) == targets
    correct, losses = [], []
    for i, r in enumerate(rows):
        spans = [(s - start, e - start) for _, s, e in r.value_spans]
        correct.append([bool(right[i, s:e].all()) for s, e in spans])
        losses.append([float(ce[i, s:e].mean()) for s, e in spans])
    return correct, losses, state


@torch.no_grad()
def evaluate_recall(
    model,
    *,
    gaps: Sequence[int],
    ks: Sequence[int] = (1, 4, 16, 64),
    variants: Sequence[str] = ("standard",),
    min_queries: int = 8,
    seed: int = 0,
    tokenizer: Any = None,
    segment_len: int = 2048,
    key_len: int = KEY_LEN,
    value_len: int = VALUE_LEN,
    progress: bool = True,
    on_cell: Callable[[dict], None] | None = None,
) -> dict:
    """Query accuracy of ``model`` by gap, number of pairs and variant.

    Args:
        model: a :class:`~memzoo.MemZooForCausalLM`.
        gaps: tokens between the pairs and the queries.
        ks: pairs per row.
        variants: ``"standard"`` and/or ``"overwrite"`` (an update block halfway through the gap).
        min_queries: queries per (gap, k) at least: ``ceil(min_queries / k)`` rows of each k.
        seed: seeds the rows (the same pairs at every gap).
        tokenizer: default ``memzoo.tokenizer()`` (byte level).
        segment_len: tokens per forward call while streaming.
        progress: a progress bar over the cells, weighted by tokens, with its ETA.
        on_cell: called with each finished cell (e.g. to save partial results).

    Returns:
        ``{"design", "gaps", "ks", "variants", "min_queries", "seed", "chance", "cells": [...]}``; a cell
        is one (gap, variant, k): ``accuracy`` (share of queries answered exactly), ``value_ce`` (mean
        nats per value token), ``n_queries``, for the overwrite variant ``updated_accuracy`` (the
        reassigned keys alone), and, shared by the cell's rows, ``tokens``, ``seconds``,
        ``state_bytes`` (per row, after the gap).
    """
    from tqdm.auto import tqdm

    bad = set(variants) - {"standard", "overwrite"}
    if bad:
        raise ValueError(f"unknown recall variant(s) {sorted(bad)}: use standard and/or overwrite")
    tok = tokenizer or default_tokenizer()
    model.eval()
    cells = []
    bar = tqdm(total=sum(gaps) * len(variants), desc="recall", unit="tok", unit_scale=True, disable=not progress)
    for variant in variants:
        for gap in gaps:
            began = time.perf_counter()
            rows = recall_cell_rows(gap, ks, seed, overwrite=variant == "overwrite", min_queries=min_queries,
                                    key_len=key_len, value_len=value_len)  # fmt: skip
            # a cell of a long gap streams for minutes: its own bar shows where it is (cells of 64K and more)
            correct, losses, state = _score_cell(model, rows, tok, segment_len, progress=progress and gap >= 65536)
            seconds = time.perf_counter() - began
            state_bytes = state.nbytes() // len(rows)
            for k in ks:
                mine = [i for i, r in enumerate(rows) if r.k == k]
                hits = [h for i in mine for h in correct[i]]
                cell = {
                    "gap": gap,
                    "variant": variant,
                    "k": k,
                    "accuracy": round(sum(hits) / len(hits), 4),
                    "value_ce": round(sum(x for i in mine for x in losses[i]) / len(hits), 4),
                    "n_queries": len(hits),
                    "tokens": len(rows[0].text),
                    "rows": len(rows),
                    "seconds": round(seconds, 3),
                    "state_bytes": state_bytes,
                }
                if variant == "overwrite":
                    moved = [h for i in mine for (key, _, _), h in zip(rows[i].value_spans, correct[i]) if key in rows[i].updated]
                    cell["updated_accuracy"] = round(sum(moved) / len(moved), 4)
                cells.append(cell)
                if on_cell is not None:
                    on_cell(cell)
            bar.update(gap)
            bar.set_postfix(gap=f"{gap:,}", variant=variant)
    bar.close()
    return {
        "design": model.config.memory,
        "gaps": list(gaps),
        "ks": list(ks),
        "variants": list(variants),
        "min_queries": min_queries,
        "seed": seed,
        "key_len": key_len,
        "value_len": value_len,
        "chance": 10.0**-value_len,
        "cells": cells,
    }
