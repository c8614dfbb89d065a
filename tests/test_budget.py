"""The budget of a warm-started model counts every stage behind it, and survives the runs' folders."""

import json

import memzoo
from memzoo.cli import main
from memzoo.training.budget import chain_totals, task_curriculum, warm_chain


def _recipe(path, name, task, n_tokens, batch_size, steps, init_from=None):
    warm = f", init_from: {init_from}" if init_from else ""
    path.write_text(
        f"name: {name}\nmodel: {{memory: full, d_model: 32, n_layers: 1, n_heads: 2}}\n"
        f"task: {{name: {task}, curriculum: [{{until: 1.0, n_tokens: {n_tokens}, batch_size: {batch_size}}}]}}\n"
        f"train: {{steps: {steps}, segment_len: {n_tokens}, save_every: 0{warm}}}\n"
    )
    return path


def test_a_two_stage_chain_counts_both_stages_and_the_backbone(tmp_path):
    """backbone (passkey, shipped) -> stage 1 (recall run) -> stage 2 (recall run, shipped): the card and the
    record give each stage's steps and tokens, the task's total, and the other task's apart."""
    backbone = _recipe(tmp_path / "b.yaml", "b", "passkey", 300, 2, 2)
    assert main(["passkey", "train", "--config", str(backbone), "--out", str(tmp_path / "run-b")]) == 0
    assert main(["passkey", "ship", "--run", str(tmp_path / "run-b"), "--config", str(backbone), "--out", str(tmp_path / "ck-b")]) == 0
    one = _recipe(tmp_path / "1.yaml", "one", "recall", 128, 2, 3, init_from=tmp_path / "ck-b")
    assert main(["recall", "train", "--config", str(one), "--out", str(tmp_path / "run-1")]) == 0
    two = _recipe(tmp_path / "2.yaml", "two", "recall", 160, 1, 2, init_from=tmp_path / "run-1" / "model")
    assert main(["recall", "train", "--config", str(two), "--out", str(tmp_path / "run-2")]) == 0

    run = json.loads((tmp_path / "run-2" / "run.json").read_text())
    assert run["task"] == "recall" and run["tokens"] == 2 * 160
    chain = run["warm_start"]["chain"]  # read when the run started
    assert [(s["task"], s["steps"], s["tokens"]) for s in chain] == [("passkey", 2, 2 * 2 * 300), ("recall", 3, 3 * 2 * 128)]

    assert main(["recall", "ship", "--run", str(tmp_path / "run-2"), "--config", str(two), "--out", str(tmp_path / "ck-2")]) == 0
    for folder in ("run-b", "run-1", "run-2"):  # the record must not need the runs any more
        for f in sorted((tmp_path / folder).rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
    full = warm_chain(tmp_path / "ck-2")
    assert [s["tokens"] for s in full] == [1200, 768, 320]
    assert chain_totals(full, "recall") == {"steps": 5, "tokens": 768 + 320, "tokens_complete": True,
                                            "train_seconds": full[1]["train_seconds"] + full[2]["train_seconds"]}  # fmt: skip
    assert chain_totals(full)["tokens"] == 1200 + 768 + 320
    training = json.loads((tmp_path / "ck-2" / "training.json").read_text())
    assert training["warm_start"]["source_train_seconds"] == chain_totals(chain)["train_seconds"]

    from memzoo.cards import write_card

    card = write_card(tmp_path / "ck-2").read_text()
    assert "with its warm starts: 5 steps = 0.00M tokens on this task, 0.00M on other tasks" in card
    assert "(passkey): 2 steps, 0.00M tokens" in card and "(recall): 3 steps, 0.00M tokens" in card


def test_a_checkpoint_shipped_over_itself_before_chains_keeps_its_seconds(tmp_path):
    """A legacy record whose warm start is its own folder: one earlier stage, same task, tokens not recorded."""
    folder = tmp_path / "ck"
    memzoo.build("full", d_model=32, n_layers=1, n_heads=2).save_pretrained(folder)
    curriculum = [{"until": 1.0, "n_tokens": 100, "batch_size": 4}]
    record = {"task": "passkey", "steps": 5, "train": {"steps": 10}, "curriculum": curriculum, "train_seconds": 60.0,
              "warm_start": {"source": str(folder), "copied": 3, "kept_init": [], "source_train_seconds": 120.0}}  # fmt: skip
    (folder / "training.json").write_text(json.dumps(record))
    earlier, own = warm_chain(folder)
    assert earlier["task"] == "passkey" and earlier["tokens"] is None and earlier["train_seconds"] == 120.0
    assert own["tokens"] == 5 * 400  # counted from the curriculum: 5 of 10 planned steps
    totals = chain_totals([earlier, own], "passkey")
    assert totals["tokens"] == 2000 and not totals["tokens_complete"] and totals["train_seconds"] == 180.0


def test_a_task_without_a_curriculum_counts_its_batch_functions_shape():
    assert task_curriculum({"name": "passkey"}) == [{"until": 1.0, "n_tokens": 1024, "batch_size": 8}]
    assert task_curriculum({"name": "recall", "n_tokens": 512}) == [{"until": 1.0, "n_tokens": 512, "batch_size": 4}]
    stages = [{"until": 1.0, "n_tokens": 64, "batch_size": 1}]
    assert task_curriculum({"name": "booksum", "curriculum": stages}) is stages
