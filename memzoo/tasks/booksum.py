"""Book summarization data: BookSum through ``datasets``, and synthetic books with known summaries.

BookSum (Kryscinski et al., arXiv 2105.08209) comes from the Hub or from local files in the
same schema, both through ``datasets.load_dataset``:

| level | default hub id | config | text column | summary column |
|---|---|---|---|---|
| chapter | ``kmfoda/booksum`` | - | ``chapter`` | ``summary_text`` |
| book | ``ubaada/booksum-complete-cleaned`` | ``books`` | ``text`` | ``summary`` |

A summary cell may be a string or, as in the ``ubaada`` schema, a list of summaries from
several sources (strings or ``{"source", "text", ...}`` dicts): the first one is the reference.

The synthetic task (:func:`make_synthetic_book`) runs offline: chapters of varied narrative
filler with a few key events ("In chapter 3, Mara found the silver key at the lighthouse.")
spread through the book; the reference summary lists those events in order. With one event
per chapter (``n_chapters=n_events``) the summary's sentences count the chapters up from 1, so
each "In chapter c," is a key the book holds once and a model can write the summary by finding
it and copying what follows: the form a small model learns (see the booksum recipes).
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from .passkey import _byte_offset, _encode, _fit_length

__all__ = ["BookExample", "BooksumUnavailableError", "load_booksum", "make_synthetic_book"]

_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_TRUTHY = ("1", "ON", "YES", "TRUE")  # what huggingface_hub accepts as "set"
# File suffix -> the `datasets` packaged builder that reads it.
_BUILDERS = {
    ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow",
}


@dataclass(frozen=True)
class _Defaults:
    hub_id: str
    config: str | None
    text_column: str
    summary_column: str


_LEVELS = {
    "chapter": _Defaults("kmfoda/booksum", None, "chapter", "summary_text"),
    "book": _Defaults("ubaada/booksum-complete-cleaned", "books", "text", "summary"),
}


@dataclass(frozen=True)
class BookExample:
    """A text to summarize and its reference summary.

    Attributes:
        text: the chapter or book.
        summary: the reference summary.
        id: an identifier, unique within a split.
        events: the key event sentences a synthetic book holds, in order (empty for BookSum);
            the event-recall score counts those the predicted summary repeats.
    """

    text: str
    summary: str
    id: str
    events: tuple[str, ...] = ()


class BooksumUnavailableError(RuntimeError):
    """BookSum could not be fetched from the Hub (offline mode, or no network)."""


# ----------------------------------------------------------------------------- BookSum


def load_booksum(
    split: str = "test",
    level: str = "chapter",
    path: str | os.PathLike[str] | None = None,
    hub_id: str | None = None,
    text_column: str | None = None,
    summary_column: str | None = None,
    limit: int | None = None,
    id_column: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> list[BookExample]:
    """Loads BookSum examples from the Hub or from local files in the same schema.

    Args:
        split: ``"train"``, ``"validation"`` or ``"test"``.
        level: ``"chapter"`` or ``"book"``; picks the default hub id and column names.
        path: local data instead of the Hub: a json/jsonl/parquet/csv/arrow file (read as
            ``split``), a directory of such files named by split (``test.jsonl``, ...), or a
            directory written by ``save_to_disk``.
        hub_id: a Hub dataset id to use instead of the level's default.
        text_column: the column holding the text (default: see the module table).
        summary_column: the column holding the reference summary.
        limit: keep the first ``limit`` examples.
        id_column: the column giving ``BookExample.id``; default ``f"{split}-{row}"``.
        cache_dir: the ``datasets`` cache directory (default: the ``datasets`` one).

    Returns:
        The examples, in dataset order.

    Raises:
        ValueError: unknown level, bad limit, a missing split, or a missing column (the message
            lists the columns present and the option to set).
        BooksumUnavailableError: the Hub could not be reached (offline mode or no network).
    """
    if level not in _LEVELS:
        raise ValueError(f"level must be one of {sorted(_LEVELS)}, got {level!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    defaults = _LEVELS[level]
    cache = None if cache_dir is None else str(cache_dir)
    if path is not None:
        source = str(path)
        dataset = _load_local(Path(path), split, cache)
    else:
        source = hub_id or defaults.hub_id
        # The default config name belongs to the default repository only.
        config = defaults.config if hub_id is None else None
        dataset = _load_hub(source, config, split, cache, level)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))

    columns = {
        "text_column": text_column or defaults.text_column,
        "summary_column": summary_column or defaults.summary_column,
    }
    if id_column is not None:
        columns["id_column"] = id_column
    for option, column in columns.items():
        if column not in dataset.column_names:
            raise ValueError(
                f"BookSum data from {source!r} (split {split!r}) has no column {column!r}; "
                f"columns present: {dataset.column_names}. Set {option}= to the right one."
            )
    texts = list(dataset[columns["text_column"]])
    summary_column = columns["summary_column"]
    summaries = [_first_summary(s, summary_column) for s in dataset[summary_column]]
    if id_column is not None:
        ids = [str(i) for i in dataset[id_column]]
    else:
        ids = [f"{split}-{row}" for row in range(len(texts))]
    return [BookExample(t, s, i) for t, s, i in zip(texts, summaries, ids)]


def _load_local(path: Path, split: str, cache_dir: str | None) -> datasets.Dataset:
    """One split of local BookSum-schema data (see ``load_booksum``'s ``path``)."""
    if not path.exists():
        raise FileNotFoundError(f"no BookSum data at {path}")
    if path.is_dir() and any((path / f).exists() for f in ("dataset_dict.json", "state.json")):
        # save_to_disk output is the one format load_dataset does not read.
        loaded = datasets.load_from_disk(str(path))
    elif path.is_dir():
        loaded = datasets.load_dataset(str(path), cache_dir=cache_dir)
    else:
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"cannot read {path}: expected a {'/'.join(sorted(_BUILDERS))} file or a directory"
            )
        loaded = datasets.load_dataset(builder, data_files={split: str(path)}, cache_dir=cache_dir)
    if isinstance(loaded, datasets.Dataset):  # a single saved Dataset stands for the split
        return loaded
    if split not in loaded:
        raise ValueError(
            f"{path} has no split {split!r}; splits present: {sorted(loaded)}. Name the files by "
            f"split ({split}.jsonl, ...) or pass the file itself as path="
        )
    return loaded[split]


def _load_hub(
    hub_id: str, config: str | None, split: str, cache_dir: str | None, level: str
) -> datasets.Dataset:
    """One split of a Hub dataset, with network and offline failures turned into advice."""
    try:
        return datasets.load_dataset(hub_id, config, split=split, cache_dir=cache_dir)
    except (ConnectionError, OSError) as error:  # offline mode raises ConnectionError too
        offline = [v for v in _OFFLINE_VARIABLES if os.environ.get(v, "").upper() in _TRUTHY]
        if offline or datasets.config.HF_HUB_OFFLINE:
            names = offline or ["HF_HUB_OFFLINE"]  # set in-process through datasets.config
            cause = f"offline mode is on ({', '.join(names)}) and the dataset is not cached"
            undo = f"or unset {' and '.join(names)} on a machine with network"
        else:
            cause = f"the Hub could not be reached ({type(error).__name__}: {error})"
            undo = "or retry with network access"
        defaults = _LEVELS[level]
        raise BooksumUnavailableError(
            f"cannot load BookSum {hub_id!r} from the Hugging Face Hub: {cause}. Fix: pass "
            f"path= with local files in the BookSum schema (json/jsonl/parquet/csv files named by "
            f"split, or a save_to_disk directory; {level}-level columns {defaults.text_column!r} "
            f"and {defaults.summary_column!r}, or set text_column=/summary_column=), {undo}."
        ) from error


def _first_summary(value: Any, column: str) -> str:
    """The reference summary in a cell: a string, or the first of a list of strings/dicts."""
    if isinstance(value, list) and value:
        value = value[0]
        if isinstance(value, dict) and "text" in value:
            value = value["text"]
    if not isinstance(value, str):
        raise ValueError(
            f"column {column!r} holds {type(value).__name__} values; expected text, or a list of "
            "texts or of {'text': ...} dicts. Set summary_column= to the column with the summary."
        )
    return value


# ----------------------------------------------------------------------------- synthetic books

_NAMES = [
    "Mara", "Tobin", "Elsa", "Corin", "Nadia", "Ivo", "Lena", "Bram", "Sola", "Edric", "Wren",
    "Pell",
]
_PLACES = [
    "lighthouse", "harbor", "old mill", "orchard", "library", "market", "chapel", "bridge",
    "forest", "tavern", "tower", "garden",
]
_TIMES = ["at dawn", "in the morning", "at noon", "in the afternoon", "at dusk", "at night"]
_WEATHER = ["rain", "fog", "wind", "snow", "sunlight", "mist", "heat", "storm"]
_FILLER_TEMPLATES = [
    "{a} walked to the {p} {t} and watched the {w}.",
    "The {w} lingered over the {p} while {a} waited for {b}.",
    "{a} told {b} a long story about the {p}.",
    "Nobody at the {p} spoke of the {w} that day.",
    "{a} and {b} shared bread near the {p} {t}.",
    "The road from the {p} to the {q} was quiet {t}.",
    "{a} remembered the {q} and smiled at {b}.",
    "{t_cap}, the {w} reached the {p}, and {a} stayed inside.",
    "{b} asked {a} whether the {p} had changed.",
    "Somewhere beyond the {q}, a bell rang twice.",
]
# Event words never appear in the filler, so an event sentence is unambiguous.
_VERBS = ["found", "lost", "buried", "hid", "repaired", "stole", "sold", "broke"]
_ADJECTIVES = ["silver", "golden", "cracked", "ancient", "crimson", "hollow", "iron", "glass"]
_OBJECTS = ["key", "map", "letter", "sword", "lantern", "compass", "ring", "crown"]


def _longest(words: list[str]) -> str:
    return max(words, key=len)


# An upper bound on a filler sentence's length (same longest word for both names and places).
_MAX_FILLER = max(
    len(template.format(
        a=_longest(_NAMES), b=_longest(_NAMES), p=_longest(_PLACES), q=_longest(_PLACES),
        t=_longest(_TIMES), t_cap=_longest(_TIMES), w=_longest(_WEATHER),
    ))
    for template in _FILLER_TEMPLATES
)


def _filler_sentence(rng: random.Random) -> str:
    """One narrative filler sentence drawn from templates and word lists."""
    a, b = rng.sample(_NAMES, 2)
    p, q = rng.sample(_PLACES, 2)
    t = rng.choice(_TIMES)
    return rng.choice(_FILLER_TEMPLATES).format(
        a=a, b=b, p=p, q=q, t=t, t_cap=t[0].upper() + t[1:], w=rng.choice(_WEATHER)
    )


def _book_text(
    n_chars: int, events: list[tuple[int, str]], n_chapters: int, seed: int
) -> str | None:
    """A book of at most ``n_chars`` characters with each ``(chapter, sentence)`` event inside.

    Chapter c nominally starts at character (c-1) s, with s = (n - reserve) / C; the last
    chapter also gets the reserve. A chapter starts at the first sentence boundary past its
    nominal start, so only the book's end loses characters (< 1 sentence). Each event goes at
    the first sentence boundary past a random point within the middle 80% of its chapter.

    Returns:
        The text, or None when ``n_chars`` is too small to hold every event.
    """
    rng = random.Random(seed)
    # Chapters are laid out over all but this tail, so the last chapter's event, due at most
    # one sentence before its position, still fits before the end of the book.
    reserve = _MAX_FILLER + 1 + max(len(sentence) + 1 for _, sentence in events)
    span = (n_chars - reserve) / n_chapters
    if span <= 0:
        return None
    # (character position, chapter, sentence), sorted; positions within a chapter's middle.
    pending = sorted((math.floor((c - 1 + rng.uniform(0.1, 0.9)) * span), c, s) for c, s in events)
    pieces: list[str] = []
    length, chapter = 0, 0
    while True:
        chapter_over = chapter < n_chapters and length >= chapter * span
        # An event's position lies inside its chapter, so it is due before the chapter ends.
        if pending and pending[0][1] == chapter and length >= pending[0][0]:
            kind, text = "event", pending[0][2]
        elif chapter_over:
            kind, text = "chapter", ("\n\n" if chapter else "") + f"Chapter {chapter + 1}\n"
        else:
            kind, text = "filler", _filler_sentence(rng)
        if kind != "chapter" and not pieces[-1].endswith("\n"):
            text = " " + text  # the first sentence of a chapter starts its line
        if length + len(text) > n_chars:
            break
        pieces.append(text)
        length += len(text)
        if kind == "event":
            pending.pop(0)
        elif kind == "chapter":
            chapter += 1
    return None if pending or chapter < n_chapters else "".join(pieces)


def make_synthetic_book(
    n_tokens: int,
    tokenizer: Any,
    seed: int,
    n_events: int = 8,
    n_chapters: int | None = None,
) -> BookExample:
    """A synthetic book with known key events and a reference summary listing them.

    Narrative filler (10 templates over names, places, times and weather) fills the chapters;
    ``n_events`` distinct events ("In chapter 3, Mara found the silver key at the
    lighthouse.") sit in distinct random chapters, in chapter order. The summary is those event
    sentences joined by spaces, in the order they appear. Everything is deterministic from
    ``seed`` (Python's ``random.Random``).

    Length: at most ``n_tokens`` tokens. With a byte-level tokenizer one character is one
    token and the book is within one sentence (< 100 tokens) of ``n_tokens``; with another
    tokenizer the character budget is searched (a dozen or so tokenizations of the book).
    A 1M-token book takes well under a second with a byte tokenizer.

    Args:
        n_tokens: the book's length budget in tokens (4K to 1M is the intended range).
        tokenizer: any transformers tokenizer, used only to measure length.
        seed: seeds events, their placement and the filler.
        n_events: number of key events, at most ``n_chapters``.
        n_chapters: number of chapters; default ``2 * n_events``.

    Returns:
        A :class:`BookExample` with id ``f"synthetic-{seed}-{n_tokens}"`` and its ``events``.

    Raises:
        ValueError: ``n_events < 1``, more events than chapters, or ``n_tokens`` too small to
            hold the chapters and events.
    """
    n_chapters = 2 * n_events if n_chapters is None else n_chapters
    if n_events < 1 or n_chapters < n_events:
        raise ValueError(
            f"need 1 <= n_events <= n_chapters, got n_events={n_events}, n_chapters={n_chapters}"
        )
    rng = random.Random(seed)
    chapters = sorted(rng.sample(range(1, n_chapters + 1), n_events))
    combos: set[tuple[str, ...]] = set()
    while len(combos) < n_events:  # distinct (who, did what, to which thing, where)
        words = (_NAMES, _VERBS, _ADJECTIVES, _OBJECTS, _PLACES)
        combos.add(tuple(rng.choice(w) for w in words))
    # Sorting the set would tie event content to chapter order; shuffle it instead.
    ordered = sorted(combos)
    rng.shuffle(ordered)
    events = [
        (c, f"In chapter {c}, {who} {verb} the {adj} {obj} at the {place}.")
        for c, (who, verb, adj, obj, place) in zip(chapters, ordered)
    ]
    text_seed = rng.getrandbits(64)

    def build(n_chars: int) -> str | None:
        return _book_text(n_chars, events, n_chapters, text_seed)

    offset = _byte_offset(tokenizer)
    if offset is not None:
        text = build(n_tokens)
    else:
        def count(n_chars: int) -> int:
            # A budget too small for the events counts as fitting, so the search passes it.
            book = build(n_chars)
            return 0 if book is None else len(_encode(book, tokenizer, None))

        sample = " ".join(_filler_sentence(random.Random(0)) for _ in range(64))
        chars_per_token = len(sample) / max(1, len(_encode(sample, tokenizer, None)))
        n_chars = _fit_length(count, n_tokens, guess=int(n_tokens * chars_per_token))
        text = None if n_chars is None else build(n_chars)
    if text is None:
        raise ValueError(
            f"n_tokens={n_tokens} is too small for {n_chapters} chapters and {n_events} events; "
            "use more tokens or fewer events/chapters"
        )
    sentences = tuple(sentence for _, sentence in events)
    return BookExample(text=text, summary=" ".join(sentences), id=f"synthetic-{seed}-{n_tokens}", events=sentences)
