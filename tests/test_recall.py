"""Long-gap associative recall: rows, training batches, scoring (against an oracle) and the CLI, at tiny size."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

import memzoo
from memzoo.cli import main
from memzoo.tasks.passkey import _filler
from memzoo.tasks.recall import (
    KEY_LEN,
    PAIRS_HEADER,
    QUERY_HEADER,
    UPDATE_HEADER,
    VALUE_LEN,
    _score_cell,
    evaluate_recall,
    item_len,
    make_recall_row,
    make_recall_training_batch,
    recall_cell_rows,
)
from memzoo.training.recipe import train_recipe


def test_a_row_holds_its_pairs_a_gap_of_the_stated_length_and_queries_of_every_key():
    g = torch.Generator().manual_seed(0)
    row = make_recall_row(5, 200, g, lead=30)
    pairs_end = row.text.index(PAIRS_HEADER) + len(PAIRS_HEADER) + 5 * item_len(KEY_LEN, VALUE_LEN)
    assert row.text.index(PAIRS_HEADER) == 30  # the lead is filler before the pairs
    assert row.query_start - pairs_end == 200 == row.gap
    assert row.text[row.query_start :].startswith(QUERY_HEADER)
    assert sorted(key for key, _, _ in row.value_spans) == sorted(row.pairs)  # every key asked once
    for key, start, end in row.value_spans:
        assert row.text[start - KEY_LEN - 1 : start] == f"{key}=" and row.text[start:end] == row.pairs[key]
        assert f"{key}={row.pairs[key]} " in row.text[:pairs_end]
    assert len(set(row.pairs)) == 5 and all(len(v) == VALUE_LEN and v.isdigit() for v in row.pairs.values())
    assert UPDATE_HEADER not in row.text


def test_the_overwrite_variant_asks_for_the_latest_value_and_keeps_the_gap():
    g = torch.Generator().manual_seed(1)
    row = make_recall_row(8, 300, g, n_updates=2, update_at=0.5)
    assert len(row.updated) == 2 and all(row.answers[k] != row.pairs[k] for k in row.updated)
    assert all(row.answers[k] == row.pairs[k] for k in row.pairs if k not in row.updated)
    block = row.text.index(UPDATE_HEADER)
    pairs_end = row.text.index(PAIRS_HEADER) + len(PAIRS_HEADER) + 8 * item_len(KEY_LEN, VALUE_LEN)
    assert pairs_end < block < row.query_start and row.query_start - pairs_end == 300  # the update is inside the gap
    for key, start, end in row.value_spans:
        assert row.text[start:end] == row.answers[key]
    with pytest.raises(ValueError, match="shorter than the update block"):
        make_recall_row(8, 10, g, n_updates=2)
    with pytest.raises(ValueError, match="n_updates"):
        make_recall_row(2, 100, g, n_updates=3)


def test_a_cells_rows_align_their_query_blocks_and_repeat_small_k():
    rows = recall_cell_rows(500, [1, 4, 16], seed=0, min_queries=8)
    assert [r.k for r in rows] == [1] * 8 + [4] * 2 + [16]
    assert len({r.query_start for r in rows}) == 1 and all(r.gap == 500 for r in rows)
    again = recall_cell_rows(900, [1, 4, 16], seed=0, min_queries=8)
    assert [r.pairs for r in again] == [r.pairs for r in rows]  # the same facts at every gap: a paired comparison


def test_training_batches_are_exact_length_and_weigh_the_answers_as_one_group():
    tok = memzoo.tokenizer()
    batch = make_recall_training_batch(6, 700, tok, 3, ks=(1, 4, 16, 64))  # k = 64 (~780 tokens) does not fit
    ids, labels, weights, answer = batch["input_ids"], batch["labels"], batch["loss_weights"], batch["metric_masks"]["answer"]
    assert ids.shape == (6, 700) and (labels[:, 0] == -100).all() and torch.equal(labels[:, 1:], ids[:, 1:])
    assert set((answer.sum(1) // VALUE_LEN).tolist()) <= {1, 4, 16}  # VALUE_LEN digits per queried value
    torch.testing.assert_close(weights.sum(1), torch.full((6,), 1.2))  # answer 1.0 + other 0.2 per row
    torch.testing.assert_close((weights * answer).sum(1), torch.ones(6))
    for row in range(6):  # the answer mask covers digits that follow "=" in the query block
        text = tok.decode(ids[row])
        digits = [text[i] for i in answer[row].nonzero().flatten().tolist()]
        assert all(d.isdigit() for d in digits) and QUERY_HEADER in text
    assert torch.equal(make_recall_training_batch(6, 700, tok, 3)["input_ids"], ids)  # a seed gives the same batch
    with pytest.raises(ValueError, match="holds none of"):
        make_recall_training_batch(1, 40, tok, 0, ks=(16,))


@dataclass
class _Pos:
    pos: torch.Tensor

    def nbytes(self) -> int:
        return 8 * self.pos.numel()


class _Oracle(torch.nn.Module):
    """Knows each row in full and predicts its next token exactly (or wrongly on the value tokens)."""

    def __init__(self, ids: torch.Tensor, wrong: torch.Tensor | None = None):
        super().__init__()
        self.ids, self.wrong = ids, wrong
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.config = type("Config", (), {"memory": "oracle"})()

    def init_state(self, b, device=None):
        return _Pos(torch.zeros((), dtype=torch.long))

    def stream(self, ids, segment_len, state, progress=False):
        return type("Out", (), {"state": _Pos(state.pos + ids.shape[1])})()

    def forward(self, ids, state):
        p, n = int(state.pos), ids.shape[1]
        assert torch.equal(ids, self.ids[:, p : p + n]), "the scorer fed tokens out of order"
        target = self.ids[:, p + 1 : p + 1 + n]
        if self.wrong is not None:
            target = torch.where(self.wrong[:, p + 1 : p + 1 + n], (target + 1) % 300, target)
        return type("Out", (), {"logits": 50.0 * torch.nn.functional.one_hot(target, 300).float()})()


def test_scoring_reads_each_value_from_the_position_before_it():
    """An oracle that predicts every next token scores 1; one wrong only on one digit of each value scores 0."""
    tok = memzoo.tokenizer()
    rows = recall_cell_rows(150, [1, 4], seed=0, min_queries=4)
    width = max(len(r.text) for r in rows)
    texts = [r.text + _filler(width - len(r.text)) for r in rows]  # the scorer pads a short row with filler
    ids = torch.stack([torch.tensor(tok.encode(t, add_special_tokens=False)) for t in texts])
    correct, losses, _ = _score_cell(_Oracle(ids), rows, tok, segment_len=64)
    assert all(all(c) for c in correct) and all(x < 1e-3 for row in losses for x in row)
    wrong = torch.zeros_like(ids, dtype=torch.bool)
    for i, r in enumerate(rows):
        for _, _, end in r.value_spans:
            wrong[i, end - 1] = True  # the last digit of each value
    correct, _, _ = _score_cell(_Oracle(ids, wrong), rows, tok, segment_len=64)
    assert not any(any(c) for c in correct)


def test_evaluate_recall_reports_each_k_and_variant():
    torch.manual_seed(0)
    model = memzoo.build("window", d_model=32, n_layers=1, n_heads=2, budget=64, evict_every=32).eval()
    out = evaluate_recall(model, gaps=[128, 256], ks=[1, 4], variants=["standard", "overwrite"], min_queries=4, progress=False)
    assert [(c["variant"], c["gap"], c["k"]) for c in out["cells"]] == [
        (v, g, k) for v in ("standard", "overwrite") for g in (128, 256) for k in (1, 4)
    ]
    assert all(0 <= c["accuracy"] <= 1 and c["n_queries"] == 4 and c["state_bytes"] > 0 for c in out["cells"])
    assert all("updated_accuracy" in c for c in out["cells"] if c["variant"] == "overwrite")
    with pytest.raises(ValueError, match="standard and/or overwrite"):
        evaluate_recall(model, gaps=[128], variants=["shuffled"], progress=False)


def test_recall_eval_and_compare_from_the_cli(tmp_path, capsys):
    """eval writes JSON and keeps finished gaps on a rerun; compare measures each memory-off control,
    prints it below its design and draws the figures; full has no control."""
    torch.manual_seed(0)
    memzoo.build("sinks", d_model=32, n_layers=1, n_heads=2, budget=64, evict_every=32).save_pretrained(tmp_path / "recall-sinks")
    memzoo.build("full", d_model=32, n_layers=1, n_heads=2).save_pretrained(tmp_path / "recall-full")
    opts = ["--ks", "1", "4", "--min-queries", "4", "--out", str(tmp_path / "res"), "--quiet"]
    assert main(["recall", "eval", "--checkpoint", str(tmp_path / "recall-sinks"), "--gaps", "128", *opts]) == 0
    first = json.loads((tmp_path / "res" / "sinks.json").read_text())
    assert first["complete"] and [c["k"] for c in first["cells"]] == [1, 4]
    assert main(["recall", "eval", "--checkpoint", str(tmp_path / "recall-sinks"), "--gaps", "128", "200", *opts]) == 0
    again = json.loads((tmp_path / "res" / "sinks.json").read_text())
    assert again["cells"][:2] == first["cells"] and [c["gap"] for c in again["cells"]] == [128, 128, 200, 200]
    assert len(again["commands"]) == 2
    capsys.readouterr()
    paths = [str(tmp_path / "recall-sinks"), str(tmp_path / "recall-full")]
    assert main(["recall", "compare", "--checkpoints", *paths, "--gaps", "128", *opts]) == 0
    out = capsys.readouterr().out
    assert "[1/4]" in out and "no memory-off control" in out and "  memory off" in out
    control = json.loads((tmp_path / "res" / "sinks-memory-off.json").read_text())
    assert control["memory_off"] and "most recent 64 tokens" in control["memory_off_means"]
    assert (tmp_path / "res" / "comparison-standard.png").stat().st_size > 0 and (tmp_path / "res" / "state.png").stat().st_size > 0


def test_recall_recipe_trains_and_probes(tmp_path):
    recipe = {
        "name": "tiny",
        "model": {"memory": "full", "d_model": 32, "n_layers": 1, "n_heads": 2},
        "task": {"name": "recall", "ks": [1, 4], "curriculum": [{"until": 1.0, "n_tokens": 200, "batch_size": 2}]},
        "train": {"steps": 3, "lr": 0.01, "warmup_steps": 1, "segment_len": 200, "log_every": 1, "save_every": 0},
        "eval": {"ks": [1, 4], "probe_every": 3, "probe_gaps": [64]},
    }
    train_recipe(recipe, tmp_path / "run", progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2, 3] and all(entry["ce_answer"] > 0 for entry in log)
    probes = [json.loads(line) for line in (tmp_path / "run" / "probes.jsonl").read_text().splitlines()]
    assert [p["step"] for p in probes] == [3] and [(c["gap"], c["k"]) for c in probes[0]["cells"]] == [(64, 1), (64, 4)]


def test_a_curriculum_stage_may_set_its_own_ks():
    from memzoo.training.recipe import make_batch_fn

    task = {"name": "recall", "ks": [4], "curriculum": [{"until": 0.5, "n_tokens": 300, "batch_size": 3, "ks": [1]},
                                                        {"until": 1.0, "n_tokens": 300, "batch_size": 3}]}  # fmt: skip
    batch_fn = make_batch_fn(task, steps=4)
    early, late = (batch_fn(step, torch.Generator().manual_seed(0))["metric_masks"]["answer"].sum(1) for step in (0, 3))
    assert early.tolist() == [VALUE_LEN] * 3 and late.tolist() == [4 * VALUE_LEN] * 3  # 1 or 4 queried values


def test_a_recall_card_gives_accuracy_by_gap_with_its_control(tmp_path):
    from memzoo.cards import write_card

    torch.manual_seed(0)
    memzoo.build("sinks", d_model=32, n_layers=1, n_heads=2, budget=64, evict_every=32).save_pretrained(tmp_path / "recall-sinks")
    training = {"derived_from": "x", "command": "memzoo recall derive", "task": "recall"}
    (tmp_path / "recall-sinks" / "training.json").write_text(json.dumps(training))
    opts = ["--gaps", "128", "200", "--ks", "1", "4", "--min-queries", "4", "--out", str(tmp_path / "res"), "--quiet"]
    assert main(["recall", "eval", "--checkpoint", str(tmp_path / "recall-sinks"), *opts]) == 0
    assert main(["recall", "eval", "--checkpoint", str(tmp_path / "recall-sinks"), "--memory-off", *opts]) == 0
    card = write_card(tmp_path / "recall-sinks", tmp_path / "res" / "sinks.json").read_text()
    results = json.loads((tmp_path / "res" / "sinks.json").read_text())
    control = json.loads((tmp_path / "res" / "sinks-memory-off.json").read_text())
    assert "## Recall accuracy" in card and "| standard | 4 |" in card and "gap 200" in card
    first = next(c for c in results["cells"] if c["k"] == 1 and c["gap"] == 128)
    off = next(c for c in control["cells"] if c["k"] == 1 and c["gap"] == 128)
    assert f"| standard | 1 | {first['accuracy']:.2f} / {off['accuracy']:.2f} |" in card
