"""BookSum loading (local files through datasets, offline errors) and synthetic books."""

import json
import re
from pathlib import Path

import datasets
import pytest
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from memzoo.tasks.booksum import (
    BookExample,
    BooksumUnavailableError,
    load_booksum,
    make_synthetic_book,
)

FIXTURES = Path(__file__).parent / "fixtures" / "booksum"


# Offline as the docs tell users: the variables, and the flags the libraries read at import.
pytestmark = pytest.mark.usefixtures("offline_hub")


@pytest.fixture(scope="module")
def tok():
    return transformers.ByT5Tokenizer(extra_ids=0)


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines()]


def test_local_directory_loads_by_split(tmp_path):
    examples = load_booksum("test", path=FIXTURES / "chapter", cache_dir=tmp_path)
    expected = rows("chapter/test.jsonl")
    assert examples == [
        BookExample(r["chapter"], r["summary_text"], f"test-{i}") for i, r in enumerate(expected)
    ]
    validation = load_booksum("validation", path=FIXTURES / "chapter", limit=1, cache_dir=tmp_path)
    assert [e.summary for e in validation] == [rows("chapter/validation.jsonl")[0]["summary_text"]]


def test_single_file_and_id_column(tmp_path):
    examples = load_booksum(
        "test", path=FIXTURES / "chapter" / "test.jsonl", id_column="book_id", cache_dir=tmp_path
    )
    assert [e.id for e in examples] == [r["book_id"] for r in rows("chapter/test.jsonl")]


def test_save_to_disk_directory_matches_the_files(tmp_path):
    saved = datasets.DatasetDict({"test": datasets.Dataset.from_list(rows("chapter/test.jsonl"))})
    saved.save_to_disk(tmp_path / "saved")
    from_disk = load_booksum("test", path=tmp_path / "saved")
    assert from_disk == load_booksum("test", path=FIXTURES / "chapter", cache_dir=tmp_path / "c")


def test_book_level_takes_the_first_of_several_summaries(tmp_path):
    examples = load_booksum("test", level="book", path=FIXTURES / "book", cache_dir=tmp_path)
    assert [e.summary for e in examples] == [r["summary"][0]["text"] for r in rows("book/test.jsonl")]
    assert examples[1].text.startswith("Chapter 1. Tobin")


def test_missing_column_split_or_level_says_what_to_set(tmp_path):
    with pytest.raises(ValueError, match=r"no column 'text'.*'chapter'.*Set text_column="):
        load_booksum("test", level="book", path=FIXTURES / "chapter", cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"no column 'abstract'.*Set summary_column="):
        load_booksum(path=FIXTURES / "chapter", summary_column="abstract", cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"no split 'train'.*\['test', 'validation'\]"):
        load_booksum("train", path=FIXTURES / "chapter", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="level"):
        load_booksum(level="paragraph", path=FIXTURES / "chapter")


@pytest.mark.parametrize(("level", "hub_id"), [("chapter", None), ("book", None), ("book", "me/books")])
def test_hub_offline_error_names_the_cause_and_the_fix(tmp_path, level, hub_id):
    with pytest.raises(BooksumUnavailableError) as info:
        load_booksum("test", level=level, hub_id=hub_id, cache_dir=tmp_path)
    message = str(info.value)
    assert "offline mode is on" in message and "HF_HUB_OFFLINE" in message
    assert "path=" in message and (hub_id or "booksum") in message
    # The libraries themselves refused (offline mode), not the socket guard.
    assert "OfflineModeIsEnabled" in repr(info.value.__cause__)


def test_synthetic_book_is_deterministic_and_sized(tok):
    book = make_synthetic_book(4096, tok, seed=3)
    assert book == make_synthetic_book(4096, tok, seed=3)
    assert book.text != make_synthetic_book(4096, tok, seed=4).text
    assert book.id == "synthetic-3-4096"
    n = len(tok.encode(book.text, add_special_tokens=False))
    assert 4096 - 100 < n <= 4096
    # Narrative, not one repeated sentence.
    sentences = re.split(r"(?<=\.)\s+", book.text)
    assert len(set(sentences)) > 0.8 * len(sentences) > 40


@pytest.mark.parametrize(
    ("n_tokens", "seed", "n_events", "n_chapters"),
    [(20_000, 11, 5, 9), (1500, 0, 10, 12), (1500, 1, 10, 12)],  # roomy, and ~2 sentences a chapter
)
def test_synthetic_events_sit_in_their_chapters_in_order(tok, n_tokens, seed, n_events, n_chapters):
    book = make_synthetic_book(n_tokens, tok, seed=seed, n_events=n_events, n_chapters=n_chapters)
    events = re.findall(r"In chapter \d+, [^.]*\.", book.summary)
    assert len(events) == n_events and " ".join(events) == book.summary and tuple(events) == book.events
    positions = [book.text.index(e) for e in events]
    assert positions == sorted(positions)
    for event, at in zip(events, positions):
        chapter = int(re.match(r"In chapter (\d+)", event).group(1))
        assert book.text.rindex("Chapter ", 0, at) == book.text.index(f"Chapter {chapter}\n")
    assert book.text.count("Chapter ") == n_chapters


def test_one_event_per_chapter_counts_the_chapters_up(tok):
    book = make_synthetic_book(4096, tok, seed=5, n_events=4, n_chapters=4)
    assert [e.split(",")[0] for e in book.events] == [f"In chapter {c}" for c in range(1, 5)]
    for event in book.events:  # each event sentence is a key the book holds exactly once
        assert book.text.count(event.split(",")[0] + ",") == 1


def test_synthetic_million_tokens_and_subword_lengths(tok):
    book = make_synthetic_book(1_000_000, tok, seed=0)
    assert 1_000_000 - 100 < len(book.text) <= 1_000_000  # byte tokenizer: chars = tokens
    word_model = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    word_model.pre_tokenizer = pre_tokenizers.Whitespace()
    word_model.train_from_iterator(
        [book.text[:200_000]], trainers.WordLevelTrainer(special_tokens=["[UNK]"], show_progress=False)
    )
    words = transformers.PreTrainedTokenizerFast(tokenizer_object=word_model)
    small = make_synthetic_book(3000, words, seed=0)
    n = len(words.encode(small.text, add_special_tokens=False))
    assert 2900 < n <= 3000


def test_synthetic_book_rejects_impossible_requests(tok):
    with pytest.raises(ValueError, match="n_events"):
        make_synthetic_book(4096, tok, seed=0, n_events=0)
    with pytest.raises(ValueError, match="n_events"):
        make_synthetic_book(4096, tok, seed=0, n_events=5, n_chapters=4)
    with pytest.raises(ValueError, match="too small"):
        make_synthetic_book(300, tok, seed=0)
