"""The comparison page's summary pairs each result with its memory-off control, and only with one of the same weights."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_gen_pages():
    spec = importlib.util.spec_from_file_location("gen_pages", ROOT / "docs" / "gen_pages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def result(far: float, weights: str, **extra) -> dict:
    cells = [{"length": 4096, "depth": d, "accuracy": 1.0 if d == 1 else far, "state_bytes": 1024, "tokens_per_s": 10}
             for d in (0.0, 0.5, 1.0)]  # fmt: skip
    return {"design": "window", "cells": cells, "weights_sha256": weights, **extra}


def test_the_summary_shows_a_control_of_the_same_weights_only(tmp_path, monkeypatch):
    gen = load_gen_pages()
    monkeypatch.setattr(gen, "RESULTS", tmp_path)
    (tmp_path / "passkey").mkdir()
    (tmp_path / "passkey-control").mkdir()
    (tmp_path / "passkey" / "window.json").write_text(json.dumps(result(0.75, "aaa")))
    control = tmp_path / "passkey-control" / "window-memory-off.json"
    control.write_text(json.dumps(result(0.25, "aaa", memory_off=True)))
    assert "| 0.75 / 0.25 |" in gen.summary_section()
    control.write_text(json.dumps(result(0.25, "bbb", memory_off=True)))  # measured on other weights: stale
    summary = gen.summary_section()
    assert "| 0.75 |" in summary and "0.25" not in summary


def test_a_checkpoint_below_the_tasks_budget_is_flagged(tmp_path, monkeypatch):
    """Tokens are the run's own (recorded, or counted from its curriculum) plus the same task's warm starts; below the
    most any shipped checkpoint of the task has had: flagged. Other tasks' tokens are shown apart."""
    gen = load_gen_pages()
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    curriculum = [{"until": 1.0, "n_tokens": 1000, "batch_size": 2}]
    record = {"task": "passkey", "steps": 10, "train": {"steps": 10}, "curriculum": curriculum, "train_seconds": 60}
    for name, info in {"passkey-full": record, "short": record | {"steps": 4}}.items():
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        (tmp_path / "checkpoints" / name / "training.json").write_text(json.dumps(info))
    assert gen.training_budget("checkpoints/short") == "4 steps × 2.0K tokens = 0.0M tokens **below the task's budget of 0.0M**, 1 min"
    assert gen.training_budget("checkpoints/passkey-full") == "10 steps × 2.0K tokens = 0.0M tokens, 1 min"
    assert gen.task_budget("passkey") == 20_000
    stage = {"source": "checkpoints/passkey-full", "steps": 10, "tokens": 20_000, "train_seconds": 60}
    warm = {"source": "checkpoints/passkey-full", "copied": 3, "kept_init": [], "chain": [stage | {"task": "passkey"}]}
    (tmp_path / "checkpoints" / "longer").mkdir()
    (tmp_path / "checkpoints" / "longer" / "training.json").write_text(json.dumps(record | {"warm_start": warm}))
    assert gen.training_budget("checkpoints/longer") == (
        "10 steps × 2.0K tokens = 0.0M tokens; 0.0M on this task with its warm starts, 2 min (warm from `checkpoints/passkey-full`)")
    assert gen.task_budget("passkey") == 40_000 and "below the task's budget" in gen.training_budget("checkpoints/passkey-full")
    warm["chain"][0]["task"] = "recall"  # a backbone trained on another task: its tokens shown apart, not counted
    (tmp_path / "checkpoints" / "longer" / "training.json").write_text(json.dumps(record | {"warm_start": warm}))
    assert "(+0.0M on other tasks)" in gen.training_budget("checkpoints/longer") and gen.task_budget("passkey") == 20_000


def test_the_booksum_table_groups_books_by_length_and_draws_them(tmp_path, monkeypatch):
    gen = load_gen_pages()
    monkeypatch.setattr(gen, "RESULTS", tmp_path)
    monkeypatch.setattr(gen, "FIG", tmp_path / "figures")
    assert "Not measured yet" in gen.booksum_events_section([])
    books = [{"id": f"synthetic-{seed}-{n}", "event_recall": recall, "overall": 50.0, "state_bytes": 100}
             for seed, n, recall in ((0, 4096, 1.0), (1, 4096, 0.5), (0, 16384, 0.25))]  # fmt: skip
    (tmp_path / "booksum-events").mkdir()
    command = "memzoo booksum eval --checkpoint checkpoints/booksum-window"
    record = {"model": "window", "design": "window", "books": books, "command": command}
    (tmp_path / "booksum-events" / "window.json").write_text(json.dumps(record))
    provenance: list[str] = []
    section = gen.booksum_events_section(provenance)
    # the commands go to the page's end; the section points there
    assert command not in section and gen.SEE_PROVENANCE in section and command in provenance[0]
    # 4K: the mean of two books; 16K: one; 64K and 256K: none
    assert "| `window` (memory off) | eviction | — | **0.75** (50) | **0.25** (50) | — | — |" in section
    assert (tmp_path / "figures" / "booksum_events.png").stat().st_size > 0


def test_book_length_reads_synthetic_ids_only():
    from memzoo.plots import book_length

    assert book_length("synthetic-3-65536") == 65536
    assert book_length("test-0") is None and book_length("synthetic-x-y") is None
