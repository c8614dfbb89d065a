"""Book summarization recipe at tiny size: training batches, evaluation (memzoo and transformers), CLI end to end, offline."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import memzoo
from memzoo.cli import main
from memzoo.metrics import ROUGE_TYPES
from memzoo.tasks.booksum import load_booksum
from memzoo.tasks.booksum_eval import (
    FACT_ROLES,
    SUMMARY_PROMPT,
    TRAIN_SEED_RANGE,
    encode_summary_example,
    evaluate_booksum,
    evaluate_booksum_hf,
    event_recall,
    fact_positions,
    make_booksum_batch,
    make_booksum_training_batch,
    synthetic_books,
)
from memzoo.training.recipe import curriculum_stage, load_recipe, make_batch_fn

REPO = Path(__file__).resolve().parents[1]
BOOKSUM_CONFIGS = sorted((REPO / "recipes" / "configs" / "booksum").rglob("*.yaml"))
FIXTURES = Path(__file__).parent / "fixtures" / "booksum"
ROUGE_KEYS = {*ROUGE_TYPES, "overall"}


# No network anywhere in this file: the recipe must run offline end to end.
pytestmark = pytest.mark.usefixtures("offline_hub")


@pytest.fixture(scope="module")
def tok():
    return memzoo.tokenizer()


def test_training_batch_targets_the_summary(tok):
    batch = make_booksum_training_batch(2, 700, tok, 0, n_events=2, summary_weight=1.0, other_weight=0.25)
    ids, labels, weights = batch["input_ids"], batch["labels"], batch["loss_weights"]
    assert ids.shape == labels.shape == weights.shape and ids.shape[0] == 2
    for row in range(2):
        valid = labels[row] != -100
        m = int(valid.sum()) + 1  # the row's length: every position but the first has a label
        assert labels[row, 0] == -100 and torch.equal(labels[row, 1:m], ids[row, 1:m])  # transformers' convention
        target = labels[row][weights[row] == 1.0]
        text = tok.decode(target)
        assert text.startswith(" In chapter ") and text.endswith("</s>")
        context = tok.decode(ids[row, : m - len(target)])
        assert context.endswith(SUMMARY_PROMPT) and "Chapter 1\n" in context
        assert set(weights[row, 1:m].unique().tolist()) == {0.25, 1.0} and not weights[row, m:].any() and not weights[row, 0]
        assert torch.equal(batch["metric_masks"]["summary"][row], weights[row] == 1.0)  # the log's ce_summary
    # deterministic from the generator: a resumed run sees the same books
    again = make_booksum_training_batch(2, 700, tok, torch.Generator().manual_seed(0), n_events=2, other_weight=0.25)
    assert torch.equal(again["input_ids"], ids)


def test_event_recall_counts_whole_events_only(tok):
    book = synthetic_books(2048, [3], tok, n_events=4, n_chapters=4)[0]
    first, second, third, fourth = book.events
    assert event_recall(book.summary, book.events) == 1.0
    assert event_recall(f"{first} {third}", book.events) == 0.5
    who = first.split(", ")[1].split()[0]  # "In chapter 1, Mara found ..." -> the right person, a wrong object
    assert event_recall(first.replace(who, "Nobody"), book.events) == 0.0
    assert event_recall(book.summary, ()) is None  # BookSum: no events to count


def test_fact_positions_leave_the_template(tok):
    book = synthetic_books(3000, [7], tok, n_events=3, n_chapters=3)[0]
    spans = fact_positions(book)
    assert len(spans) == 5 * 3
    template = list(book.summary)
    for begin, end in spans:
        assert book.summary[begin:end].isalpha() or " " in book.summary[begin:end]  # a word ("old mill": two)
        template[begin:end] = ["_"] * (end - begin)
    expected = " ".join(f"In chapter {c}, _ _ the _ _ at the _." for c in (1, 2, 3))
    assert re.sub("_+", "_", "".join(template)) == expected


def test_evaluation_books_are_held_out(tok):
    with pytest.raises(ValueError, match="training range"):
        synthetic_books(1024, [TRAIN_SEED_RANGE[0]], tok, n_events=2)
    assert [b.id for b in synthetic_books(1024, [0, 1], tok, n_events=2)] == ["synthetic-0-1024", "synthetic-1-1024"]


@pytest.mark.parametrize("path", BOOKSUM_CONFIGS, ids=[p.stem for p in BOOKSUM_CONFIGS])
def test_every_booksum_config_makes_batches(path):
    recipe = load_recipe(path)
    steps = recipe["train"]["steps"]
    real = recipe["task"]["name"] == "booksum"
    if real:  # BookSum itself: the local fixture in its schema (short chapters) stands for the Hub
        recipe["task"] |= {"path": str(FIXTURES / recipe["task"]["level"]), "split": "test"}
    batch_fn = make_batch_fn(recipe["task"], steps)
    for step in (0, steps - 1):  # first and last curriculum stage
        batch = batch_fn(step, torch.Generator().manual_seed(step))
        n = curriculum_stage(recipe["task"]["curriculum"], step, steps)["n_tokens"]
        assert batch["input_ids"].shape[1] <= n if real else batch["input_ids"].shape[1] > n // 2
        assert batch["loss_weights"].max() == recipe["task"]["summary_weight"]


@pytest.mark.parametrize("name", ["window", "infini"])
def test_streamed_evaluation_equals_one_generate_call(tok, name):
    """Streaming the book, then decoding from the state, is exactly generate() on book + prompt."""
    torch.manual_seed(0)
    overrides = dict(budget=64, evict_every=32) if name == "window" else dict(segment_len=64)
    model = memzoo.build(name, d_model=32, n_layers=1, n_heads=2, **overrides).eval()
    books = synthetic_books(600, [3], tok, n_events=2)
    results = evaluate_booksum(model, books, max_new_tokens=12, segment_len=100, progress=False)
    context, _ = encode_summary_example(books[0], tok)
    alone = model.generate(context[None], max_new_tokens=12, segment_len=37, eos_token_id=tok.eos_token_id)
    new = alone[0, len(context) :]
    assert results["books"][0]["prediction"] == tok.decode(new[new != tok.eos_token_id], skip_special_tokens=True).strip()
    assert set(results["rouge"]) == ROUGE_KEYS and results["books"][0]["state_bytes"] > 0


def test_sampling_is_seeded(tok):
    torch.manual_seed(0)
    model = memzoo.build("window", d_model=32, n_layers=1, n_heads=2, budget=64, evict_every=32).eval()
    books = synthetic_books(400, [1], tok, n_events=1)
    runs = [evaluate_booksum(model, books, max_new_tokens=20, do_sample=True, seed=s, progress=False) for s in (5, 5, 6)]
    assert runs[0]["books"][0]["prediction"] == runs[1]["books"][0]["prediction"] != runs[2]["books"][0]["prediction"]
    assert runs[0]["decoding"] == {"do_sample": True, "temperature": 0.5, "top_p": 0.95, "max_new_tokens": 20, "seed": 5}


def test_recipe_end_to_end_offline(tmp_path):
    """train 2 steps -> ship -> derive namm -> eval one 2K-token book -> card -> compare, all through the CLI."""
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "name: tiny-booksum\nmodel: {memory: full, d_model: 32, n_layers: 1, n_heads: 2}\n"
        "task: {name: booksum-synthetic, n_events: 2, summary_weight: 1.0, other_weight: 0.1,"
        " curriculum: [{until: 1.0, n_tokens: 600, batch_size: 2}]}\n"
        "train: {steps: 2, segment_len: 256, warmup_steps: 1, save_every: 0, log_every: 1}\n"
        "eval: {probe_every: 2, probe_lengths: [600], probe_books: 1, n_events: 2, n_chapters: 2}\n"
    )
    run, full, namm, res = tmp_path / "run", tmp_path / "booksum-full", tmp_path / "booksum-namm", tmp_path / "res"
    assert main(["booksum", "train", "--config", str(config), "--out", str(run)]) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(r["ce_summary"] > 0 for r in log)  # the summary's own cross-entropy, logged
    (probe,) = [json.loads(line) for line in (run / "probes.jsonl").read_text().splitlines()]  # at the last step
    (cell,) = probe["cells"]
    assert probe["step"] == 2 and cell["length"] == 600 and cell["fact_ce"] > 0 and cell["template_ce"] > 0 and cell["event_recall"] == 0
    roles = cell["fact_ce_by_role"]  # as many facts of each role: their mean is the facts' mean
    assert list(roles) == list(FACT_ROLES) and sum(roles.values()) / len(roles) == pytest.approx(cell["fact_ce"], abs=1e-3)
    assert main(["booksum", "ship", "--run", str(run), "--config", str(config), "--out", str(full)]) == 0
    assert main(["booksum", "derive", "--from", str(full), "--memory", "namm", "--set", "budget=256", "evict_every=128",
                 "--bf16", "--out", str(namm)]) == 0  # fmt: skip
    eval_args = ["--lengths", "2048", "--n-books", "1", "--n-events", "2", "--max-new-tokens", "16", "--out", str(res), "--quiet"]
    assert main(["booksum", "eval", "--checkpoint", str(full), *eval_args, "--n-chapters", "2"]) == 0
    results = json.loads((res / "full.json").read_text())
    assert results["complete"] and results["n_books"] == 1 and set(results["rouge"]) == ROUGE_KEYS
    book = results["books"][0]
    assert 1900 < book["n_tokens"] <= 2048 and ROUGE_KEYS <= set(book) and book["generated_tokens"] <= 16
    assert results["data"] == {"source": "synthetic", "lengths": [2048], "seeds": [0], "n_events": 2, "n_chapters": 2}
    assert book["reference"].startswith("In chapter 1, ") and " In chapter 2, " in book["reference"]  # one event per chapter
    # 16 new tokens are shorter than any event sentence, so none can be repeated whole
    assert min(len(e) for e in book["reference"].split(". ")) > 16 and book["event_recall"] == results["event_recall"] == 0.0
    assert results["checkpoint"] == str(full) and "booksum eval" in results["command"]

    from memzoo.cards import write_card

    card = write_card(full, res / "full.json").read_text()
    training = json.loads((full / "training.json").read_text())
    assert training["task"] == "booksum-synthetic" and "memzoo booksum train" in training["command"]
    assert "tags: [memzoo, long-context, booksum, full]" in card and "2 steps" in card and "| **all** |" in card
    assert "synthetic books of 2K tokens" in card and f"{results['rouge']['overall']:.2f}" in card
    assert "No training of its own" in write_card(namm).read_text()

    assert main(["booksum", "compare", "--checkpoints", str(full), str(namm), *eval_args]) == 0
    compared = {p.stem: json.loads(p.read_text()) for p in res.glob("*.json")}
    assert set(compared) == {"full", "namm"} and all(r["complete"] for r in compared.values())
    # a 2K book under a 256-token NAMM budget: the state stays bounded
    assert compared["namm"]["books"][0]["state_bytes"] < compared["full"]["books"][0]["state_bytes"]


def test_booksum_rows_keep_the_summary_and_the_texts_beginning(tok):
    examples = load_booksum("test", path=FIXTURES / "chapter")
    batch = make_booksum_batch(examples, 8, 64, tok, 0, other_weight=0.25)
    ids, weights = batch["input_ids"], batch["loss_weights"]
    assert ids.shape[0] == 8 and ids.shape[1] <= 64 and set(weights[weights > 0].unique().tolist()) == {0.25, 1.0}
    texts = {tok.decode(row[row != tok.pad_token_id]) for row in ids}
    for text in texts:
        chapter, summary = text.split(SUMMARY_PROMPT)
        example = next(e for e in examples if e.text.startswith(chapter))  # the text's beginning, cut to fit
        assert summary.removesuffix("</s>") == " " + example.summary[: len(summary) - 1].removesuffix("</s>")
    assert torch.equal(make_booksum_batch(examples, 8, 64, tok, 0, other_weight=0.25)["input_ids"], ids)  # seeded
    with pytest.raises(ValueError, match="no examples"):
        make_booksum_batch([], 1, 64, tok, 0)
    with pytest.raises(ValueError, match="no room"):
        make_booksum_batch(examples, 1, 20, tok, 0)


def test_the_booksum_task_reads_its_data_once_and_says_what_to_do_offline(tmp_path):
    steps = 4
    task = {"name": "booksum", "level": "chapter", "path": str(FIXTURES / "chapter"), "split": "test",
            "curriculum": [{"until": 1.0, "n_tokens": 128, "batch_size": 2}]}  # fmt: skip
    batch = make_batch_fn(task, steps)(0, torch.Generator().manual_seed(0))
    assert batch["input_ids"].shape[0] == 2 and batch["loss_weights"].max() == 1.0
    config = tmp_path / "chapters.yaml"  # the recipe's way in, on the fixture: train 2 steps, ship, card
    config.write_text(
        "name: tiny-chapters\nmodel: {memory: full, d_model: 32, n_layers: 1, n_heads: 2}\n"
        f"task: {json.dumps(task)}\ntrain: {{steps: 2, segment_len: 128, warmup_steps: 1, save_every: 0, log_every: 1}}\n"
    )
    assert main(["booksum", "train", "--config", str(config), "--out", str(tmp_path / "run")]) == 0
    assert main(["booksum", "ship", "--run", str(tmp_path / "run"), "--config", str(config), "--out", str(tmp_path / "ck")]) == 0
    from memzoo.cards import write_card

    assert "BookSum texts" in write_card(tmp_path / "ck").read_text()
    from memzoo.tasks.booksum import BooksumUnavailableError

    with pytest.raises(BooksumUnavailableError, match="path="):  # the Hub, offline: the fix is in the message
        make_batch_fn({"name": "booksum", "level": "chapter", "cache_dir": str(tmp_path)} | {"split": "train"}, steps)


def test_eval_on_local_booksum_files(tmp_path):
    """The BookSum path of the CLI: local files in the hub's schema, through load_booksum."""
    torch.manual_seed(0)
    memzoo.build("window", d_model=32, n_layers=1, n_heads=2, budget=64, evict_every=32).save_pretrained(tmp_path / "ck")
    assert main(["booksum", "eval", "--checkpoint", str(tmp_path / "ck"), "--data", "booksum", "--path", str(FIXTURES / "chapter"),
                 "--limit", "2", "--max-new-tokens", "8", "--out", str(tmp_path / "res"), "--quiet"]) == 0  # fmt: skip
    results = json.loads((tmp_path / "res" / "window.json").read_text())
    assert results["n_books"] == 2 and results["books"][0]["reference"] == "Mara lights the lighthouse lamp during a storm."
    assert results["data"]["source"] == "booksum" and results["data"]["split"] == "test"


@pytest.fixture(scope="module")
def llama(tok):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, initializer_range=0.2,
        bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def test_evaluate_booksum_hf_with_evicting_cache(tok, llama, tmp_path):
    """A tiny random Llama reads a 2K-token book with a bounded EvictingCache (no download)."""
    mh = pytest.importorskip("memzoo.hf", reason="memzoo.hf (EvictingCache) is not available")
    books = synthetic_books(2048, [0], tok, n_events=2)
    full = evaluate_booksum_hf(llama, tok, books, cache_factory=lambda: mh.EvictingCache("full"), max_new_tokens=10, progress=False)
    default = evaluate_booksum_hf(llama, tok, books, max_new_tokens=10, progress=False)  # transformers' DynamicCache
    assert full["books"][0]["prediction"] == default["books"][0]["prediction"]
    for policy in ("window", "h2o"):  # h2o scores by attention: runs inside memzoo.hf.attention_probs
        bounded = evaluate_booksum_hf(
            llama, tok, books, cache_factory=lambda p=policy: mh.EvictingCache(p, 256, evict_every=128), max_new_tokens=10, progress=False
        )
        assert bounded["model"] == f"llama-{policy}" and set(bounded["rouge"]) == ROUGE_KEYS
        assert bounded["books"][0]["cache_tokens"] < 256 + 128 and bounded["prefill_chunk_size"] == 128
    # the same through the CLI, from a saved model folder
    llama.save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    assert main(["booksum", "eval", "--hf", str(tmp_path / "llama"), "--cache", "window", "--budget", "256", "--evict-every", "128",
                 "--lengths", "2048", "--n-books", "1", "--n-events", "2", "--max-new-tokens", "10",
                 "--out", str(tmp_path / "res"), "--quiet"]) == 0  # fmt: skip
    results = json.loads((tmp_path / "res" / "hf-llama-window.json").read_text())
    assert results["books"][0]["prediction"] == bounded_window_prediction(llama, tok, books, mh)


def bounded_window_prediction(model, tok, books, mh) -> str:
    cache = lambda: mh.EvictingCache("window", 256, evict_every=128)  # noqa: E731
    return evaluate_booksum_hf(model, tok, books, cache_factory=cache, max_new_tokens=10, progress=False)["books"][0]["prediction"]


def test_the_card_table_shows_event_recall_for_books_with_events():
    from memzoo.cards import rouge_table

    scores = {"rouge1": 50.0, "rouge2": 25.0, "rougeL": 40.0, "overall": 36.84}
    book = {"id": "synthetic-0-1024", "n_tokens": 990, **scores, "event_recall": 0.5}
    results = {"books": [book], "rouge": scores, "event_recall": 0.5}
    lines = rouge_table(results).splitlines()
    assert lines[0].endswith("overall | event recall |") and lines[2].endswith("| 36.84 | 0.50 |") and lines[-1].endswith("| 0.50 |")
    real = {**results, "books": [{**book, "event_recall": None}], "event_recall": None}  # BookSum: no events to count
    assert "event recall" not in rouge_table(real) and rouge_table(real).splitlines()[2].endswith("| 36.84 |")
