"""Passkey retrieval: the Landmark-attention prompt, its scoring, and training batches.

The prompt is the one of Landmark Attention (Mohtashami & Jaggi, arXiv 2305.16300), character
for character::

    <INTRO>
    <filler cut to length a>
    The pass key is 12345. Remember it. 12345 is the pass key.
    <filler cut to length b>
    What is the pass key? The pass key is

The filler is ``FILLER`` repeated, repetitions joined by one space, and *both* filler parts are
prefixes of that same stream, cut at character granularity (mid-sentence if need be), exactly as
Landmark's ``garbage_inf[:n]``. An empty filler part leaves an empty line, as in Landmark.

The model should continue the prompt with ``ANSWER_TEMPLATE`` (``" 12345."``) and is scored by
:func:`score`: the first integer in its generated text must equal the key. The trained answer
ends with a full stop, as the needle's sentence does: a model never shown where the answer ends
goes on writing digits after the key (measured: " 683399" for 68239), and a sixth digit makes the
first integer wrong however well the key was recalled.

Token counts: with a byte-level tokenizer (``memzoo.tokenizer()``, ByT5 style, byte b -> b + 3)
one character is one token, so a prompt has exactly the requested number of tokens and ids are
computed with byte arithmetic (1M tokens in milliseconds). With any other tokenizer the filler
length is found by a search over whole-prompt tokenizations: the prompt is as long as possible
without exceeding the requested number of tokens (cost: ~log2(n) tokenizer calls).

Dimension letters: b batch, n total length (see ``memzoo/interface.py``).
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "ANSWER_TEMPLATE",
    "FILLER",
    "INTRO",
    "NEEDLE_TEMPLATE",
    "QUESTION",
    "PasskeySample",
    "make_eval_grid",
    "make_sample",
    "make_training_batch",
    "random_key",
    "score",
]

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "them. I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE_TEMPLATE = "The pass key is {k}. Remember it. {k} is the pass key."
QUESTION = "What is the pass key? The pass key is"
ANSWER_TEMPLATE = " {k}."  # what follows QUESTION: a space, the key's digits, a full stop

# The needle split around its two copies of the key, so their character offsets are known.
_NEEDLE_HEAD, _NEEDLE_MID, _ = NEEDLE_TEMPLATE.split("{k}")

_FIRST_INTEGER = re.compile(r"[0-9]+")  # ASCII digits only: "\d" would also match e.g. "١٢"
# Printable ASCII plus newline: every character a passkey prompt or a synthetic book uses.
_BYTE_PROBE = "".join(map(chr, range(32, 127))) + "\n"


@dataclass
class PasskeySample:
    """One passkey prompt, tokenized, with the positions a loss or an analysis needs.

    Attributes:
        prompt: the prompt text, ending with ``QUESTION`` (no trailing space).
        input_ids: ``[n]`` the prompt's token ids, no special tokens.
        key: the pass key.
        answer: the text the model should generate after the prompt, ``f" {key}"`` (a space,
            then the digits); :func:`score` only looks at the first integer, so anything the
            model writes after the digits ("." or a newline) does not matter.
        depth: where the needle sits, 0 = right after the intro, 1 = right before the question.
        needle_span: ``(start, end)`` token indices of the needle sentence, end exclusive.
        key_copy_span: ``(start, end)`` token indices of the needle's second copy of the key
            (in "Remember it. {k} is the pass key"), end exclusive. With a subword tokenizer a
            token straddling the boundary is included.
    """

    prompt: str
    input_ids: torch.Tensor
    key: int
    answer: str
    depth: float
    needle_span: tuple[int, int]
    key_copy_span: tuple[int, int]


# ----------------------------------------------------------------------------- tokenizer helpers


def _byte_offset(tokenizer: Any) -> int | None:
    """Returns c if ``tokenizer`` maps every ASCII byte b to id b + c (ByT5: c = 3), else None.

    Such a tokenizer is one token per character on ASCII text, which lets prompts be cut to an
    exact length and encoded with arithmetic instead of a Python-level tokenizer call.
    """
    ids = tokenizer.encode(_BYTE_PROBE, add_special_tokens=False)
    codes = _BYTE_PROBE.encode("ascii")
    if len(ids) != len(codes):
        return None
    offset = ids[0] - codes[0]
    return offset if all(i - b == offset for i, b in zip(ids, codes)) else None


def _encode(text: str, tokenizer: Any, offset: int | None) -> torch.Tensor:
    """Token ids of ``text`` without special tokens, ``[n]`` int64.

    Args:
        offset: the result of :func:`_byte_offset`; when not None the ids are computed from the
            UTF-8 bytes directly (the tokenizer would give the same ids, ~100x slower).
    """
    if offset is None:
        return torch.tensor(tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)
    data = text.encode("utf-8")
    if not data:  # torch.frombuffer rejects an empty buffer
        return torch.zeros(0, dtype=torch.long)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long() + offset


def _token_spans(
    text: str, char_spans: Sequence[tuple[int, int]], tokenizer: Any, offset: int | None
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Encodes ``text`` and maps character spans to token spans (tokens overlapping the span).

    Returns:
        ``(ids [n], token_spans)``. Byte tokenizers: spans are the character spans (ASCII text).
        Tokenizers returning offsets (transformers "fast" ones): exact overlap. Others: the
        token count of the text before each boundary, close for any sane tokenizer.
    """
    if offset is not None:
        return _encode(text, tokenizer, offset), [tuple(s) for s in char_spans]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    if "offset_mapping" in enc:
        starts = [s for s, _ in enc["offset_mapping"]]
        ends = [e for _, e in enc["offset_mapping"]]
        # First token ending after c0, first token starting at or after c1.
        spans = [
            (bisect.bisect_right(ends, c0), bisect.bisect_left(starts, c1)) for c0, c1 in char_spans
        ]
    else:
        def count(c: int) -> int:
            return len(tokenizer.encode(text[:c], add_special_tokens=False))

        spans = [(count(c0), count(c1)) for c0, c1 in char_spans]
    return ids, spans


def _fit_length(count: Callable[[int], int], limit: int, guess: int) -> int | None:
    """Largest L >= 0 with ``count(L) <= limit``, for a non-decreasing ``count``; None if none.

    Gallops from ``guess`` with steps doubling from guess / 64, then bisects the bracket: about
    a dozen calls of ``count`` when the guess is within a few percent.
    """
    if count(0) > limit:
        return None
    guess, step = max(0, guess), max(1, guess // 64)
    if count(guess) <= limit:
        lo, hi = guess, guess + step
        while count(hi) <= limit:
            lo, step = hi, 2 * step
            hi = lo + step
    else:
        lo, hi = max(0, guess - step), guess
        while count(lo) > limit:  # ends: count(0) <= limit
            hi, step = lo, 2 * step
            lo = max(0, hi - step)
    while hi - lo > 1:  # invariant: count(lo) <= limit < count(hi)
        mid = (lo + hi) // 2
        if count(mid) <= limit:
            lo = mid
        else:
            hi = mid
    return lo


def _as_generator(generator: torch.Generator | int) -> torch.Generator:
    """A ``torch.Generator``: the one given, or a new one seeded with the given int."""
    if isinstance(generator, torch.Generator):
        return generator
    return torch.Generator().manual_seed(int(generator))


# ----------------------------------------------------------------------------- prompts


def _filler(n_chars: int) -> str:
    """The first ``n_chars`` characters of FILLER repeated and joined by single spaces."""
    reps = n_chars // (len(FILLER) + 1) + 1
    return ((FILLER + " ") * reps)[:n_chars]


def _prompt(key: int, n_filler: int, depth: float) -> tuple[str, tuple[int, int], tuple[int, int]]:
    """The prompt with ``n_filler`` filler characters split by depth, and two character spans.

    Returns:
        ``(prompt, needle_chars, key_copy_chars)``, spans as ``(start, end)`` end exclusive.
    """
    n_before = round(n_filler * depth)  # round, not int(): int(0.29 * 100) == 28
    k = str(key)
    needle = NEEDLE_TEMPLATE.format(k=k)
    start = len(INTRO) + 1 + n_before + 1
    copy_start = start + len(_NEEDLE_HEAD) + len(k) + len(_NEEDLE_MID)
    parts = [INTRO, _filler(n_before), needle, _filler(n_filler - n_before), QUESTION]
    return "\n".join(parts), (start, start + len(needle)), (copy_start, copy_start + len(k))


def _check_key(key: Any) -> None:
    if isinstance(key, bool) or not isinstance(key, int) or key < 0:
        raise ValueError(f"key must be a non-negative int, got {key!r}")


def make_sample(n_tokens: int, depth: float, key: int, tokenizer: Any) -> PasskeySample:
    """Builds one passkey prompt of ``n_tokens`` tokens with the needle at ``depth``.

    With a byte-level tokenizer the prompt has exactly ``n_tokens`` tokens; with another
    tokenizer it has the most filler that keeps it at or under ``n_tokens`` (a few tokens
    short at most, since filler is cut per character). The filler is split so that
    ``round(depth * total_filler_chars)`` characters come before the needle.

    Args:
        n_tokens: prompt length in tokens (the answer is not included).
        depth: needle position in [0, 1]; 0 = right after the intro, 1 = right before the
            question.
        key: the pass key, a non-negative int.
        tokenizer: any transformers tokenizer; special tokens are never added.

    Returns:
        A :class:`PasskeySample` with ``input_ids: [n]``, ``n <= n_tokens``.

    Raises:
        ValueError: depth outside [0, 1], key not a non-negative int, or ``n_tokens`` smaller
            than the intro, needle and question with no filler.
    """
    if not 0.0 <= depth <= 1.0:  # also rejects NaN
        raise ValueError(
            f"depth must be in [0, 1] (0 = after the intro, 1 = before the question), got {depth!r}"
        )
    _check_key(key)
    offset = _byte_offset(tokenizer)
    if offset is not None:
        # One token per character: the filler length follows from the fixed parts' length.
        n_fixed = len(_prompt(key, 0, depth)[0])
        n_filler = n_tokens - n_fixed if n_tokens >= n_fixed else None
    else:
        n_fixed = len(_encode(_prompt(key, 0, depth)[0], tokenizer, None))
        sample = _filler(8 * (len(FILLER) + 1))
        chars_per_token = len(sample) / max(1, len(_encode(sample, tokenizer, None)))
        n_filler = _fit_length(
            lambda n: len(_encode(_prompt(key, n, depth)[0], tokenizer, None)),
            n_tokens,
            guess=math.ceil(max(0, n_tokens - n_fixed) * chars_per_token),
        )
    if n_filler is None:
        raise ValueError(
            f"n_tokens={n_tokens} is too small for a passkey prompt with key {key}: the intro, "
            f"needle and question alone take {n_fixed} tokens"
        )
    prompt, needle_chars, copy_chars = _prompt(key, n_filler, depth)
    ids, spans = _token_spans(prompt, [needle_chars, copy_chars], tokenizer, offset)
    return PasskeySample(
        prompt=prompt,
        input_ids=ids,
        key=key,
        answer=ANSWER_TEMPLATE.format(k=key),
        depth=float(depth),
        needle_span=spans[0],
        key_copy_span=spans[1],
    )


def score(generated_text: str, key: int) -> bool:
    """True iff the first integer in ``generated_text`` equals ``key``.

    An integer is a maximal run of ASCII digits, compared by value: "012345" equals 12345
    (Landmark compares ``int`` values too), "123456" and "1234" do not, "12,345" reads as 12,
    and a text without digits scores False. Signs are not parsed ("-5" reads as 5).

    Args:
        generated_text: what the model wrote after the prompt.
        key: the pass key.
    """
    match = _FIRST_INTEGER.search(generated_text)
    return match is not None and int(match.group()) == key


def random_key(rng: torch.Generator | int, digits: int = 5) -> int:
    """A uniformly random key with exactly ``digits`` digits (no leading zero).

    Args:
        rng: a ``torch.Generator`` (advanced by one draw) or an int seed.
        digits: number of decimal digits, >= 1.
    """
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    low = 10 ** (digits - 1) if digits > 1 else 0
    return int(torch.randint(low, 10**digits, (1,), generator=_as_generator(rng)).item())


def make_eval_grid(
    lengths: Sequence[int],
    depths: Sequence[float],
    n_keys: int,
    tokenizer: Any,
    seed: int,
    digits: int = 5,
) -> Iterator[tuple[int, float, list[PasskeySample]]]:
    """Yields the samples of an accuracy table, one cell (length, depth) at a time.

    The same ``n_keys`` keys, drawn once from ``seed``, are used in every cell, so cells differ
    only by length and depth (a paired comparison), and the same seed gives the same grid.
    Cells are built lazily, in order lengths x depths.

    Args:
        lengths: prompt lengths in tokens.
        depths: needle depths in [0, 1].
        n_keys: samples per cell.
        tokenizer: any transformers tokenizer.
        seed: seeds the keys.
        digits: digits per key.

    Yields:
        ``(n_tokens, depth, samples)`` with ``len(samples) == n_keys``.
    """
    generator = torch.Generator().manual_seed(seed)
    keys = [random_key(generator, digits) for _ in range(n_keys)]
    for n_tokens in lengths:
        for depth in depths:
            yield n_tokens, depth, [make_sample(n_tokens, depth, k, tokenizer) for k in keys]


def make_training_batch(
    batch_size: int,
    n_tokens: int,
    tokenizer: Any,
    generator: torch.Generator | int,
    depth: float | None = None,
    needle_near_end_prob: float = 0.0,
    digits: int = 5,
    answer_weight: float = 1.0,
    copy_weight: float = 1.0,
    other_weight: float = 0.2,
) -> dict[str, torch.Tensor]:
    """A batch of prompt + answer sequences with labels and per-token loss weights.

    Each row is ``make_sample(n_tokens - len(answer), ...)`` followed by the answer
    ``f" {key}"``: ``n`` = ``n_tokens`` includes the answer. With a subword tokenizer a row
    that comes out shorter is right-padded (pad id, label -100, weight 0), harmless for a
    causal model. The default weights are the ones that made a tiny model learn the task
    (an early prototype): without the copy term nothing was learned.

    Each weight belongs to a *group* of predictions (the answer, the key copy, the rest) and is
    spread evenly over that group's tokens in the row, so the loss
    ``(ce * loss_weights).sum() / loss_weights.sum()`` (with ``ce = F.cross_entropy(...,
    reduction="none", ignore_index=-100).view(b, n)``) is the weighted mean of the three groups'
    mean cross-entropies, whatever the prompt length. Weighting tokens one by one instead would
    give the 5 answer digits of a 2048-token prompt about 1% of the loss, and the answer would
    barely be trained once the filler is learned.

    Args:
        batch_size: b.
        n_tokens: n, tokens per row, answer included.
        tokenizer: any transformers tokenizer.
        generator: a ``torch.Generator`` or an int seed; draws keys and depths.
        depth: the needle depth of every row, or None for uniform random depths in [0, 1].
        needle_near_end_prob: with this probability a row (when ``depth`` is None) gets depth
            exactly 1.0, needle right before the question: a continuous uniform draw never
            produces that case, and it is the one a model trained without it fails.
        digits: digits per key.
        answer_weight: weight of predicting the answer tokens (space, digits, full stop), as a group.
        copy_weight: weight of predicting the needle's second copy of the key, as a group.
        other_weight: weight of every other prediction, as a group.

    Returns:
        ``input_ids: [b, n]`` int64; ``labels: [b, n]`` int64 in transformers' convention,
        ``labels[:, t]`` the token at position t (the model and the trainer shift them; -100 at
        the first position and on padding); ``loss_weights: [b, n]`` float32 indexed like
        ``labels``, the weight of predicting token t (0 where the label is -100; a row's weights
        sum to ``answer_weight + copy_weight + other_weight``);
        ``metric_masks``: ``{"answer": [b, n], "copy": [b, n]}`` bool, indexed like ``labels``:
        the answer's digit tokens and the needle's second copy of the key (the trainer logs the
        mean cross-entropy of predicting them: ln 10 = 2.30 nats is chance, the model has not
        found the key yet).
        ``needle_spans``: ``[b, 2]`` int64, each row's needle sentence as ``(start, end)`` token
        indices, end exclusive (for analyses, e.g. which of its tokens a KV cache still holds).
    """
    if not 0.0 <= needle_near_end_prob <= 1.0:
        raise ValueError(f"needle_near_end_prob must be in [0, 1], got {needle_near_end_prob}")
    generator = _as_generator(generator)
    offset = _byte_offset(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((batch_size, n_tokens), pad_id, dtype=torch.long)
    labels = torch.full((batch_size, n_tokens), -100, dtype=torch.long)
    weights = torch.zeros(batch_size, n_tokens)
    answer_digits = torch.zeros(batch_size, n_tokens, dtype=torch.bool)
    key_copy = torch.zeros(batch_size, n_tokens, dtype=torch.bool)
    needle_spans = torch.zeros(batch_size, 2, dtype=torch.long)
    for row in range(batch_size):
        key = random_key(generator, digits)
        # Draw both numbers every row so the key stream does not depend on the depth options.
        near_end, uniform = torch.rand(2, generator=generator).tolist()
        if depth is not None:
            row_depth = depth
        else:
            row_depth = 1.0 if near_end < needle_near_end_prob else uniform
        # Encoded in two parts so that the digits' predictions are known with any tokenizer.
        before, end_text = ANSWER_TEMPLATE.format(k=key).rsplit(str(key), 1)
        head = _encode(before + str(key), tokenizer, offset)
        answer = torch.cat([head, _encode(end_text, tokenizer, offset)])
        try:
            sample = make_sample(n_tokens - len(answer), row_depth, key, tokenizer)
        except ValueError as error:
            raise ValueError(
                f"n_tokens={n_tokens} includes a {len(answer)}-token answer; {error}"
            ) from None
        seq = torch.cat([sample.input_ids, answer])
        m, p = len(seq), len(sample.input_ids)
        input_ids[row, :m] = seq
        labels[row, 1:m] = seq[1:]  # token 0 has nothing before it to be predicted from
        needle_spans[row] = torch.tensor(sample.needle_span)
        start, end = sample.key_copy_span
        key_copy[row, start:end] = True
        answer_mask = torch.zeros(n_tokens, dtype=torch.bool)
        answer_mask[p:m] = True
        other = torch.zeros(n_tokens, dtype=torch.bool)
        other[1:m] = True
        other &= ~(answer_mask | key_copy[row])
        for group, weight in ((other, other_weight), (key_copy[row], copy_weight), (answer_mask, answer_weight)):
            weights[row, group] = weight / group.sum()
        answer_digits[row, p + 1 : p + len(head)] = True  # the answer after its leading space: the digits
    return {
        "input_ids": input_ids,
        "labels": labels,
        "loss_weights": weights,
        "metric_masks": {"answer": answer_digits, "copy": key_copy},
        "needle_spans": needle_spans,
    }
