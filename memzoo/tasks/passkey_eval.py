"""Passkey accuracy grids (lengths x depths), streamed in bounded memory.

The filler before the needle is the same text for every key, and the prompt at a shallower depth
is a prefix of the prompt at a deeper one. So each length streams its filler once, keeps a
snapshot of the state at every needle position, and only the rest of each prompt (needle, filler,
question) is streamed per key, the keys of a cell side by side in one batch. Because every design
is split invariant, this is exactly the computation of streaming each prompt on its own (the
tests check it), at a fraction of the cost.

:func:`probe_passkey` is the quick diagnosis beside the grid: the answer's teacher-forced
cross-entropy by length and depth, which tells "the key never reaches the question" (ln 10 nats)
from "almost" in seconds.
"""

from __future__ import annotations

import json
import math
import resource
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..io import write_text_atomic
from ..model import IGNORE_INDEX, shift_labels
from ..tokenization import tokenizer as default_tokenizer
from ..units import parse_length
from .passkey import make_sample, make_training_batch, random_key, score

__all__ = ["CHANCE_CE", "describe_keys", "evaluate_passkey", "parse_length", "probe_passkey", "save_results"]

#: answer cross-entropy of a model that knows nothing of the key: ln 10 nats per digit
CHANCE_CE = math.log(10)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@torch.no_grad()
def evaluate_passkey(
    model,
    *,
    lengths: Sequence[int],
    depths: Sequence[float],
    n_keys: int,
    seed: int = 0,
    tokenizer: Any = None,
    segment_len: int = 2048,
    max_new_tokens: int = 7,
    progress: bool = True,
    on_cell: Callable[[dict], None] | None = None,
) -> dict:
    """Accuracy of ``model`` on a passkey grid.

    Args:
        model: a :class:`~memzoo.MemZooForCausalLM` (put in eval mode).
        lengths: sequence lengths in tokens: prompt + ``max_new_tokens`` (the prompt has
            ``length - max_new_tokens`` tokens, so the answer ends at ``length``).
        depths: needle depths in [0, 1].
        n_keys: keys per cell (the same keys in every cell, drawn from ``seed``).
        seed: seeds the keys.
        tokenizer: default ``memzoo.tokenizer()``.
        segment_len: tokens per forward call while streaming.
        max_new_tokens: greedy tokens generated after the question (7: the trained answer
            ``" 12345."``, a space, 5 digits and a full stop).
        progress: a progress bar over the whole grid, with its ETA (weighted by length).
        on_cell: called with each finished cell's dict (e.g. to save partial results).

    Returns:
        ``{"design", "lengths", "depths", "n_keys", "seed", "cells": [...]}``; each cell has
        ``length, depth, accuracy, correct, n, generations, seconds, tokens_per_s, state_bytes,
        peak_rss_mb``.
    """
    tok = tokenizer or default_tokenizer()
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    keys = [random_key(generator) for _ in range(n_keys)]
    device = next(model.parameters()).device
    cells = []
    # one bar over the whole grid, in tokens: a cell's cost grows with its length, so the ETA does too
    bar = tqdm(total=sum(lengths) * len(depths), desc="passkey grid", unit="tok", unit_scale=True, disable=not progress)
    for length in lengths:
        # ``length`` counts every token the model sees, answer included, as in training: the prompt
        # leaves room for the answer. (With prompts of exactly 1K, 4K, ... tokens, a multiple of
        # every segment length, a segment-based design, Infini or Titans-MAC, would generate the
        # whole answer in a fresh segment, from memory alone, in every cell: an artefact of the
        # grid, not the case of a prompt of arbitrary length.)
        prompt_tokens = length - max_new_tokens
        samples = {d: [make_sample(prompt_tokens, d, k, tok) for k in keys] for d in depths}
        # The shared part of each depth's prompts: everything before the needle's line (the
        # newline before the needle is left out, so that a shallower prefix is a prefix of a deeper one).
        prefixes = {d: s[0].input_ids[: max(0, s[0].needle_span[0] - 1)] for d, s in samples.items()}
        for d, group in samples.items():
            for s in group:
                if not torch.equal(s.input_ids[: len(prefixes[d])], prefixes[d]):
                    raise RuntimeError("passkey prompts of one cell differ before the needle; cannot share the prefix")
        state, streamed = model.init_state(1, device=device), prefixes[depths[0]][:0]
        order = sorted(depths, key=lambda d: len(prefixes[d]))
        for d in order:
            start_time = time.perf_counter()
            prefix, done = prefixes[d], len(streamed)
            if not torch.equal(prefix[:done], streamed):  # not nested (a subword tokenizer): start over
                state, done = model.init_state(1, device=device), 0
            if len(prefix) > done:
                state = model.stream(prefix[None, done:].to(device), segment_len, state=state, progress=False).state
            streamed, done = prefix, len(prefix)
            rest = torch.stack([s.input_ids[done:] for s in samples[d]]).to(device)  # [n_keys, L - done]
            out, final = model.generate(rest, state=state, max_new_tokens=max_new_tokens, segment_len=segment_len, return_state=True)
            texts = tok.batch_decode(out[:, rest.shape[1] :], skip_special_tokens=True)
            hits = [score(t, s.key) for t, s in zip(texts, samples[d])]
            seconds = time.perf_counter() - start_time
            cell = {
                "length": length,
                "prompt_tokens": prompt_tokens,
                "depth": d,
                "accuracy": sum(hits) / len(hits),
                "correct": sum(hits),
                "n": len(hits),
                "keys": keys,
                "generations": texts,
                "seconds": round(seconds, 3),
                # tokens a separate run per prompt would stream, per second of this cell
                "tokens_per_s": round(length * n_keys / max(seconds, 1e-9)),
                "state_bytes": final.nbytes() // n_keys,
                "peak_rss_mb": round(_peak_rss_mb(), 1),
            }
            cells.append(cell)
            if on_cell is not None:
                on_cell(cell)
            bar.update(length)
            bar.set_postfix(length=f"{length:,}", depth=d, acc=f"{cell['accuracy']:.2f}")
    bar.close()
    cells.sort(key=lambda c: (c["length"], c["depth"]))
    return {
        "design": model.config.memory,
        "lengths": list(lengths),
        "depths": list(depths),
        "n_keys": n_keys,
        "seed": seed,
        "cells": cells,
    }


@torch.no_grad()
def probe_passkey(
    model,
    *,
    lengths: Sequence[int],
    depths: Sequence[float],
    n_rows: int = 8,
    seed: int = 0,
    tokenizer: Any = None,
    segment_len: int = 2048,
    progress: bool = True,
) -> dict:
    """Teacher-forced answer cross-entropy by length and depth: how much does the model know the key?

    Greedy accuracy says only right or wrong. This gives the mean cross-entropy of the answer's
    digits given the true earlier digits, on the training prompts (``make_training_batch`` at a fixed
    depth), a few seconds per cell: :data:`CHANCE_CE` (ln 10 = 2.30 nats) means the key did not
    reach the question at all (e.g. a memory that is never read), near 0 means it did. Rows are
    streamed ``segment_len`` tokens per call up to the answer, then the answer's logits are read.

    Args:
        model: a :class:`~memzoo.MemZooForCausalLM`.
        lengths: row lengths in tokens, answer included.
        depths: needle depths in [0, 1].
        n_rows: prompts per cell (one key each; the same keys in every cell, drawn from ``seed``).
        seed: seeds the keys.
        tokenizer: default ``memzoo.tokenizer()``.
        segment_len: tokens per forward call while streaming.
        progress: progress bar over cells.

    Returns:
        ``{"design", "chance_ce", "n_rows", "seed", "cells": [...]}``; each cell has ``length,
        depth, answer_ce`` (mean over the rows' digits, nats), ``digit_accuracy`` (argmax equals
        the digit), ``exact`` (fraction of rows with every digit right) and, for a KV-cache design
        (an eviction policy), ``needle_kept``: per layer, the fraction of the needle sentence's
        tokens still in the cache when the answer starts (mean over rows and heads), which says
        whether a wrong answer is the policy's doing (the needle was evicted) or the model's.
    """
    if not isinstance(n_rows, int) or n_rows < 1:
        raise ValueError(f"n_rows must be a positive int (prompts per cell), got {n_rows!r}")
    tok = tokenizer or default_tokenizer()
    model.eval()
    device = next(model.parameters()).device
    cells = []
    bar = tqdm(total=len(lengths) * len(depths), desc="passkey probe", unit="cell", disable=not progress)
    for length in lengths:
        for depth in depths:
            batch = make_training_batch(n_rows, length, tok, seed, depth=depth)
            ids = batch["input_ids"].to(device)
            # aligned with the logits: position t predicts labels[:, t + 1]
            labels = shift_labels(batch["labels"].to(device))
            digits = shift_labels(batch["metric_masks"]["answer"].to(device), False)
            first = int(digits.any(dim=0).nonzero()[0])  # the earliest answer prediction of any row
            state = model.init_state(n_rows, device=device)
            if first:
                state = model.stream(ids[:, :first], segment_len, state=state).state
            kept = _needle_kept(state, batch["needle_spans"].to(device))
            logits = model(ids[:, first:], state=state).logits.float()
            labels, digits = labels[:, first:], digits[:, first:]
            ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none").view_as(labels)
            right = logits.argmax(dim=-1) == labels
            cells.append({
                "length": length,
                "depth": depth,
                "answer_ce": round(float(ce[digits].mean()), 4),
                "digit_accuracy": round(float(right[digits].float().mean()), 4),
                "exact": round(float((right | ~digits).all(dim=1).float().mean()), 4),
                "n": n_rows,
                **({"needle_kept": kept} if kept is not None else {}),
            })  # fmt: skip
            bar.update(1)
    bar.close()
    return {"design": model.config.memory, "chance_ce": round(CHANCE_CE, 4), "n_rows": n_rows, "seed": seed, "cells": cells}


def _needle_kept(state, spans: torch.Tensor) -> list[float] | None:
    """Per layer, the fraction of each row's needle tokens held by a KV cache (mean over rows and
    heads); None unless every layer is a cache that records its tokens' stream positions."""
    layers = getattr(state, "layers", None) or []
    if not layers or not all(hasattr(layer, "token_pos") and hasattr(layer, "valid") for layer in layers):
        return None
    start, end = spans[:, 0, None, None], spans[:, 1, None, None]  # [b, 1, 1]: broadcast over heads and slots
    fractions = []
    for layer in layers:
        held = (layer.valid & (layer.token_pos >= start) & (layer.token_pos < end)).sum(dim=-1)  # [b, h]
        fractions.append(round(float((held / (end - start)[..., 0]).mean()), 4))
    return fractions


def describe_keys(cells: Sequence[dict]) -> dict:
    """``n_keys`` (an int when every cell has as many keys, else e.g. ``"3 (1K-64K), 1 (256K-1M)"``)
    and ``keys_per_length`` ({length: keys}) of a grid whose long lengths may have fewer keys."""
    from ..plots import format_length  # the one spelling of "4K" / "1M" (plots pulls matplotlib: import late)

    per_length = {c["length"]: c["n"] for c in sorted(cells, key=lambda c: c["length"])}
    counts = sorted(set(per_length.values()), reverse=True)
    if len(counts) <= 1:
        return {"n_keys": counts[0] if counts else 0, "keys_per_length": per_length}

    def span(n: int) -> str:
        mine = [length for length, k in per_length.items() if k == n]
        a, b = format_length(mine[0]), format_length(mine[-1])
        return a if a == b else f"{a}-{b}"

    return {"n_keys": ", ".join(f"{n} ({span(n)})" for n in counts), "keys_per_length": per_length}


def save_results(results: dict, path: str | Path) -> Path:
    """Write results JSON atomically (write to a temporary file, then rename)."""
    return write_text_atomic(path, json.dumps(results, indent=1))
