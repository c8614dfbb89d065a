"""What a model's training cost: its tokens, and every stage of the warm starts behind it.

The fair-comparison rule counts a design's budget as optimiser steps x tokens per step, **warm
starts included**: a model trained 500 steps from a model trained 2,000 steps has had 2,500 steps.
A run records its own stage (``run.json``: ``task``, ``steps``, ``tokens``, ``train_seconds``) and,
when it warm-starts, the stages of its source (``warm_start.chain``, earliest first), read when the
run starts, before the source can be replaced. ``memzoo <task> ship`` copies both into the
checkpoint's ``training.json``, so the chain survives the runs' folders.

A stage is ``{"source", "task", "steps", "tokens", "train_seconds"}``; ``tokens`` is ``None`` where
the record predates token counting (a checkpoint shipped over its own warm start before chains were
kept records only the seconds of what it replaced).
"""

from __future__ import annotations

import json
from pathlib import Path

#: the prompt shape of a task section without a curriculum, as its batch function uses it
DEFAULT_SHAPES = {"passkey": (1024, 8), "recall": (2048, 4), "booksum-synthetic": (2048, 4), "booksum": (8192, 1)}


def task_curriculum(task: dict) -> list[dict]:
    """A recipe's ``task`` section as a curriculum (one stage of ``n_tokens`` x ``batch_size`` if it has none)."""
    if task.get("curriculum"):
        return task["curriculum"]
    n_tokens, batch_size = DEFAULT_SHAPES[task["name"]]
    return [{"until": 1.0, "n_tokens": task.get("n_tokens", n_tokens), "batch_size": task.get("batch_size", batch_size)}]


def training_record(folder: str | Path) -> dict | None:
    """How a model folder was trained: a shipped checkpoint's ``training.json``, else its run's ``run.json``."""
    folder = Path(folder)
    for path in (folder / "training.json", folder.parent / "run.json"):
        if path.is_file():
            return json.loads(path.read_text())
    return None


def record_task(record: dict, folder: str | Path) -> dict | None:
    """The ``task`` section a record's run trained on (a run's resume state keeps it where the record does not)."""
    state = Path(folder).parent / "last" / "trainer_state.json"
    if state.is_file():
        return json.loads(state.read_text()).get("run", {}).get("task")
    if record.get("task") and record.get("curriculum"):  # a shipped record (its task's other keys are not kept)
        return {"name": record["task"], "curriculum": record["curriculum"]}
    return None


def record_tokens(record: dict, folder: str | Path) -> int | None:
    """A record's own training tokens: as recorded, else counted from its curriculum, steps done and steps planned."""
    from .recipe import curriculum_tokens

    if record.get("tokens"):
        return record["tokens"]
    planned = record.get("train", {}).get("steps") if isinstance(record.get("train"), dict) else None
    task = record_task(record, folder)
    if task is None or not record.get("steps") or not planned or task.get("name") not in DEFAULT_SHAPES:
        return None
    return curriculum_tokens(task_curriculum(task), record["steps"], planned)


def stage(record: dict, folder: str | Path) -> dict:
    """One chain entry for the model in ``folder``, trained as ``record`` says."""
    task = record.get("task")
    if not isinstance(task, str):
        task = (record_task(record, folder) or {}).get("name")
    return {"source": str(folder), "task": task, "steps": record.get("steps"), "tokens": record_tokens(record, folder),
            "train_seconds": record.get("train_seconds")}  # fmt: skip


def warm_chain(source: str | Path) -> list[dict]:
    """Every training stage behind the model in ``source``, earliest first, ending with its own.

    Follows each record's ``warm_start`` back: a recorded ``chain`` is taken as it is, another source is
    read (a folder with no record gives a stage of unknowns), and a checkpoint shipped over its own warm
    start before chains were kept gives one stage of the seconds it recorded, on its task, tokens unknown.
    """
    record = training_record(source)
    if record is None:
        return [{"source": str(source), "task": None, "steps": None, "tokens": None, "train_seconds": None}]
    own = stage(record, source)
    warm = record.get("warm_start") or {}
    if "chain" in warm:
        before = warm["chain"]
    elif not warm:
        before = []
    elif Path(warm["source"]).resolve() == Path(source).resolve():  # the earlier checkpoint at this path: same task
        earlier = stage({"train_seconds": warm.get("source_train_seconds")}, warm["source"])
        before = [earlier | {"task": own["task"], "note": "the earlier checkpoint at this path, since replaced"}]
    else:
        before = warm_chain(warm["source"])
    return [*before, own]


def chain_totals(chain: list[dict], task: str | None = None) -> dict:
    """Steps, tokens and seconds summed over a chain (only its stages on ``task`` if given).

    ``tokens_complete`` is False where some stage's tokens were not recorded (the sum is then a lower bound).
    """
    stages = [s for s in chain if task is None or s["task"] == task]
    return {
        "steps": sum(s["steps"] or 0 for s in stages),
        "tokens": sum(s["tokens"] or 0 for s in stages),
        "tokens_complete": all(s["tokens"] is not None for s in stages),
        "train_seconds": sum(s["train_seconds"] or 0 for s in stages),
    }
