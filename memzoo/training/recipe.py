"""Run a training recipe from a YAML config (the files under ``recipes/configs/``).

A recipe has three sections::

    model:   {memory: infini, d_model: 128, n_layers: 3, ...}      # memzoo.build(**model)
    task:    {name: passkey, curriculum: [...], ...}                # what batches look like
    train:   {steps: 1500, lr: 0.004, segment_len: 256, ...}        # TrainConfig fields
    eval:    {lengths: [...], depths: [...], n_keys: 5}             # read by the task's evaluator

A passkey, recall or synthetic-book recipe's ``eval`` may also ask for a probe during training:
``probe_every: 200`` (steps; at each save that falls on a multiple, and at the end), and for
passkey ``probe_lengths: [1K, 4K, 16K]`` and ``probe_rows: 4`` (prompts per cell, at ``eval.depths``),
for recall ``probe_gaps: [256, 1K]`` (at ``eval.ks``), for books ``probe_lengths`` and ``probe_books``.
Each probe appends ``{"step", "train_s", "cells"}`` to ``probes.jsonl`` in the run folder (the cells of
:func:`~memzoo.tasks.passkey_eval.probe_passkey`, :func:`~memzoo.tasks.recall.evaluate_recall` or
:func:`~memzoo.tasks.booksum_eval.probe_booksum`),
so a run's log shows when the memory starts to carry the facts, not only the training loss.

Tasks (``task.name``): ``passkey``, ``recall``, ``booksum-synthetic`` (synthetic books with known
key events) and ``booksum`` (BookSum itself through :func:`~memzoo.tasks.booksum.load_booksum`:
``level``, ``path`` for local files, ``hub_id``, ``split`` (default ``train``), ``limit``, ``cache_dir``; rows
longer than the stage's ``n_tokens`` keep the summary and the text's beginning).

Tasks make batches through a ``batch_fn(step, generator)``; a curriculum is a list of stages
``{until: fraction_of_steps, n_tokens: ..., batch_size: ...}``. A stage may instead hold
``mix: [{n_tokens: ..., batch_size: ...}, ...]``: its steps take those shapes in turn (step k the
``k mod len(mix)``-th), so short and long prompts are trained side by side rather than one after
the other, and a model moved on to long prompts does not forget the short ones.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import yaml

from ..registry import build
from ..tokenization import tokenizer as default_tokenizer
from .budget import task_curriculum, warm_chain
from .resume import truncate_log
from .trainer import BatchFn, TrainConfig, Trainer
from .warm_start import warm_start

__all__ = [
    "load_recipe",
    "make_batch_fn",
    "train_recipe",
    "check_curriculum",
    "curriculum_stage",
    "curriculum_tokens",
    "probe_hook",
    "TASKS",
]

SECTIONS = {"name", "model", "task", "train", "eval", "notes"}


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read and validate a recipe YAML (unknown sections or train keys raise with the valid ones)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no recipe config at {str(path)!r}; the shipped ones are under recipes/configs/")
    recipe = yaml.safe_load(path.read_text()) or {}
    unknown = set(recipe) - SECTIONS
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {sorted(unknown)}; valid: {sorted(SECTIONS)}")
    for section in ("model", "task", "train"):
        if not isinstance(recipe.get(section), dict):
            raise ValueError(f"{path}: missing section {section!r} (a mapping)")
    if "memory" not in recipe["model"]:
        raise ValueError(f"{path}: model.memory (the registry name) is required")
    valid_train = {f.name for f in dataclasses.fields(TrainConfig)}
    bad = set(recipe["train"]) - valid_train
    if bad:
        raise ValueError(f"{path}: unknown train option(s) {sorted(bad)}; valid: {sorted(valid_train)}")
    if recipe["task"].get("name") not in TASKS:
        raise ValueError(f"{path}: task.name must be one of {sorted(TASKS)}, got {recipe['task'].get('name')!r}")
    check_curriculum(recipe["task"].get("curriculum") or [], str(path))
    recipe.setdefault("name", path.stem)
    return recipe


def curriculum_stage(curriculum: list[dict], step: int, steps: int) -> dict:
    """The ``{n_tokens, batch_size}`` of ``step`` (0-based) of a run of ``steps``: its stage, or the stage's mix entry in turn."""
    stage = next((s for s in curriculum if step < s["until"] * steps), curriculum[-1])
    if "mix" in stage:
        return stage["mix"][step % len(stage["mix"])]
    return stage


def curriculum_tokens(curriculum: list[dict], steps_done: int, steps: int) -> int:
    """Training tokens (rows x tokens per row, padding included) of the first ``steps_done`` steps of a run of ``steps``.

    The budget the fair-comparison rule counts: optimiser steps x tokens per step.
    """
    shapes = (curriculum_stage(curriculum, step, steps) for step in range(steps_done))
    return sum(s["n_tokens"] * s["batch_size"] for s in shapes)


def check_curriculum(curriculum: list[dict], where: str) -> None:
    """Raise with what to write if a curriculum stage is malformed."""
    shape = "{until: fraction, n_tokens: N, batch_size: B} or {until: fraction, mix: [{n_tokens: N, batch_size: B}, ...]}"
    for stage in curriculum:
        if not isinstance(stage, dict) or "until" not in stage:
            raise ValueError(f"{where}: curriculum stage {stage!r} needs 'until'; write {shape}")
        entries = stage.get("mix", [stage])
        if not entries or not all(isinstance(e, dict) and {"n_tokens", "batch_size"} <= set(e) for e in entries):
            raise ValueError(f"{where}: curriculum stage {stage!r} needs n_tokens and batch_size; write {shape}")


def _passkey_batch_fn(task: dict, steps: int) -> BatchFn:
    from ..tasks.passkey import make_training_batch

    tok = default_tokenizer()
    curriculum = task_curriculum(task)
    options = {k: task[k] for k in ("needle_near_end_prob", "answer_weight", "copy_weight", "other_weight", "digits") if k in task}

    def batch_fn(step: int, generator) -> dict:
        stage = curriculum_stage(curriculum, step, steps)
        return make_training_batch(stage["batch_size"], stage["n_tokens"], tok, generator, **options)

    return batch_fn


def _booksum_batch_fn(task: dict, steps: int) -> BatchFn:
    from ..tasks.booksum_eval import make_booksum_training_batch

    tok = default_tokenizer()
    curriculum = task_curriculum(task)
    options = {k: task[k] for k in ("n_events", "n_chapters", "prompt", "summary_weight", "other_weight") if k in task}

    def batch_fn(step: int, generator) -> dict:
        stage = curriculum_stage(curriculum, step, steps)
        return make_booksum_training_batch(stage["batch_size"], stage["n_tokens"], tok, generator, **options)

    return batch_fn


def _booksum_data_batch_fn(task: dict, steps: int) -> BatchFn:
    """BookSum itself (``kmfoda/booksum`` chapters by default, or local files in its schema): loaded once, up front."""
    from ..tasks.booksum import load_booksum
    from ..tasks.booksum_eval import make_booksum_batch

    tok = default_tokenizer()
    names = ("split", "level", "path", "hub_id", "text_column", "summary_column", "limit", "cache_dir")
    examples = load_booksum(**{"split": "train"} | {k: task[k] for k in names if k in task})
    curriculum = task_curriculum(task)
    options = {k: task[k] for k in ("prompt", "summary_weight", "other_weight") if k in task}

    def batch_fn(step: int, generator) -> dict:
        stage = curriculum_stage(curriculum, step, steps)
        return make_booksum_batch(examples, stage["batch_size"], stage["n_tokens"], tok, generator, **options)

    return batch_fn


def _recall_batch_fn(task: dict, steps: int) -> BatchFn:
    from ..tasks.recall import make_recall_training_batch

    tok = default_tokenizer()
    curriculum = task_curriculum(task)
    names = ("ks", "overwrite_prob", "key_len", "value_len", "answer_weight", "other_weight")
    options = {k: task[k] for k in names if k in task}

    def batch_fn(step: int, generator) -> dict:
        stage = curriculum_stage(curriculum, step, steps)  # a stage may set its own ks (few pairs first)
        mine = options | {k: stage[k] for k in names if k in stage}
        return make_recall_training_batch(stage["batch_size"], stage["n_tokens"], tok, generator, **mine)

    return batch_fn


#: task name -> (task section, total steps) -> batch_fn
TASKS = {
    "passkey": _passkey_batch_fn, "booksum-synthetic": _booksum_batch_fn, "booksum": _booksum_data_batch_fn, "recall": _recall_batch_fn,
}  # fmt: skip


def make_batch_fn(task: dict, steps: int) -> BatchFn:
    """The batch function of a recipe's ``task`` section."""
    return TASKS[task["name"]](task, steps)


PROBE_DEFAULTS = {"probe_lengths": [1024, 4096, 16384], "probe_rows": 4, "probe_gaps": [256, 1024]}


def _passkey_probe(ev: dict):
    from ..tasks.passkey_eval import probe_passkey
    from ..units import format_length, parse_length

    lengths = [parse_length(x) for x in ev.get("probe_lengths", PROBE_DEFAULTS["probe_lengths"])]
    depths = ev.get("depths", [0.0, 0.25, 0.5, 0.75, 1.0])
    rows = ev.get("probe_rows", PROBE_DEFAULTS["probe_rows"])

    def run(model) -> list[dict]:
        return probe_passkey(model, lengths=lengths, depths=depths, n_rows=rows, progress=False)["cells"]

    def summary(cells: list[dict]) -> str:
        by_length = {n: [c["answer_ce"] for c in cells if c["length"] == n and c["depth"] < 1] for n in lengths}
        shown = ", ".join(f"{format_length(n)} {sum(v) / len(v):.2f}" for n, v in by_length.items() if v)
        return f"answer cross-entropy at depths < 1 (nats per digit; chance 2.30): {shown}"

    return run, summary


def _recall_probe(ev: dict):
    from ..tasks.recall import evaluate_recall
    from ..units import format_length, parse_length

    gaps = [parse_length(x) for x in ev.get("probe_gaps", PROBE_DEFAULTS["probe_gaps"])]
    ks = ev.get("ks", [1, 4, 16, 64])

    def run(model) -> list[dict]:
        return evaluate_recall(model, gaps=gaps, ks=ks, progress=False)["cells"]

    def summary(cells: list[dict]) -> str:
        per_gap = ("; ".join(f"k={c['k']} {c['accuracy']:.2f}" for c in cells if c["gap"] == g) for g in gaps)
        return "recall accuracy by gap: " + " | ".join(f"{format_length(g)}: {text}" for g, text in zip(gaps, per_gap))

    return run, summary


def _booksum_probe(ev: dict):
    from ..tasks.booksum_eval import probe_booksum
    from ..units import format_length, parse_length

    lengths = [parse_length(x) for x in ev.get("probe_lengths", [1024, 4096])]
    books = {k: ev[k] for k in ("n_events", "n_chapters") if k in ev} | {"n_books": ev.get("probe_books", 2)}

    def run(model) -> list[dict]:
        return probe_booksum(model, lengths=lengths, **books)["cells"]

    def summary(cells: list[dict]) -> str:
        return "summary facts / template cross-entropy, event recall: " + ", ".join(
            f"{format_length(c['length'])} {c['fact_ce']:.2f} / {c['template_ce']:.2f}, {c['event_recall']:.2f}" for c in cells
        )

    return run, summary


#: task name -> eval section -> (run(model) -> cells, summary(cells) -> one line)
PROBES = {"passkey": _passkey_probe, "recall": _recall_probe, "booksum-synthetic": _booksum_probe}


def probe_hook(recipe: dict, out_dir: str | Path, *, progress: bool = True):
    """The trainer's ``on_save`` callback that probes the model every ``eval.probe_every`` steps (None if unset).

    Passkey: the teacher-forced answer cross-entropy (:func:`~memzoo.tasks.passkey_eval.probe_passkey`)
    at ``eval.probe_lengths`` x ``eval.depths``, ``probe_rows`` prompts per cell. Recall: the query
    accuracy (:func:`~memzoo.tasks.recall.evaluate_recall`) at ``eval.probe_gaps`` x ``eval.ks``.
    Synthetic books: the summary's fact and template cross-entropy and the event recall
    (:func:`~memzoo.tasks.booksum_eval.probe_booksum`) at ``eval.probe_lengths`` (default 1K, 4K),
    ``probe_books`` books each (default 2) with ``eval.n_events`` / ``eval.n_chapters``.
    The probe runs without gradients on prompts of its own seed and puts the model back in
    training mode, so it changes nothing the next step computes (a resumed run stays exact).
    """
    ev = recipe.get("eval") or {}
    every = ev.get("probe_every", 0)
    if not every:
        return None
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"eval.probe_every must be a positive number of steps, got {every!r}")
    task = recipe["task"]["name"]
    if task not in PROBES:
        raise ValueError(f"eval.probe_every probes {' or '.join(PROBES)}; task {task!r} has no probe: remove it")
    import torch
    from tqdm.auto import tqdm

    run, summary = PROBES[task](ev)
    path = Path(out_dir) / "probes.jsonl"

    def hook(trainer: Trainer) -> None:
        if trainer.rank != 0 or (trainer.step % every and trainer.step != trainer.config.steps):
            return
        model, was_training = trainer.model, trainer.model.training
        with torch.no_grad():
            cells = run(model)
        model.train(was_training)
        truncate_log(path, "step", trainer.step - 1)  # a probe of this step from a killed run goes
        with open(path, "a") as f:
            f.write(json.dumps({"step": trainer.step, "train_s": round(trainer.train_seconds, 1), "cells": cells}) + "\n")
        if progress:
            tqdm.write(f"probe at step {trainer.step}: {summary(cells)}")

    return hook


def train_recipe(recipe: dict, out_dir: str | Path, *, resume: bool = True, progress: bool = True, allow_changed: bool = False,
                 **train_overrides) -> dict:  # fmt: skip
    """Train the recipe's model; the final model goes to ``out_dir/model``.

    Args:
        recipe: from :func:`load_recipe`.
        out_dir: run folder (``last/`` checkpoint for resuming, ``log.jsonl``, ``model/``, ``run.json``).
        resume: continue from ``out_dir/last`` if present (refused if the model, task or train
            settings changed since it was saved, except how long to run and how often to log/save).
        progress: progress bar.
        allow_changed: resume even with changed settings (a warning names them; the checkpoint
            and ``run.json`` keep the list).
        **train_overrides: TrainConfig fields that replace the recipe's (e.g. ``steps=5``).

    Returns:
        a summary dict (also written to ``out_dir/run.json``).
    """
    import torch

    out_dir = Path(out_dir)
    train_cfg = TrainConfig(**{**recipe["train"], **train_overrides})
    torch.manual_seed(train_cfg.seed)
    model_cfg = dict(recipe["model"])
    model = build(model_cfg.pop("memory"), **model_cfg)
    warm = warm_start(model, train_cfg.init_from) if train_cfg.init_from else None  # a resume then overwrites it
    chain = warm_chain(train_cfg.init_from) if warm is not None else []
    trainer = Trainer(model, train_cfg, make_batch_fn(recipe["task"], train_cfg.steps), out_dir=out_dir,
                      run={"model": recipe["model"], "task": recipe["task"]}, allow_changed=allow_changed)  # fmt: skip
    start = time.perf_counter()
    history = trainer.fit(resume=resume, progress=progress, on_save=probe_hook(recipe, out_dir, progress=progress))
    wall = time.perf_counter() - start
    if trainer.rank == 0:
        model.save_pretrained(out_dir / "model")
    log = out_dir / "log.jsonl"
    last_logged = json.loads(log.read_text().splitlines()[-1]) if log.is_file() and log.read_text().strip() else {}
    summary = {
        "recipe": recipe["name"],
        "memory": recipe["model"]["memory"],
        "task": recipe["task"]["name"],
        "steps": trainer.step,
        # the budget the comparison counts: optimiser steps x tokens per step (this run's own)
        "tokens": curriculum_tokens(task_curriculum(recipe["task"]), trainer.step, train_cfg.steps),
        "train_seconds": round(trainer.train_seconds, 1),
        "wall_s_this_call": round(wall, 1),
        "final_loss": history[-1]["loss"] if history else last_logged.get("loss"),
        "world_size": trainer.world,
        "autocast": trainer.autocast,  # what ran: "auto" resolved on this machine
        "parameters": sum(p.numel() for p in model.parameters()),
        "train": dataclasses.asdict(train_cfg),
        "machines": trainer.machines,
    }
    if trainer.changes:
        summary["changed_on_resume"] = trainer.changes
    if warm is not None:  # with every stage behind the source, read before anything could replace it
        summary["warm_start"] = {"source": warm["source"], "copied": len(warm["copied"]), "kept_init": warm["kept_init"],
                                 "chain": chain}  # fmt: skip
    if trainer.rank == 0:
        (out_dir / "run.json").write_text(json.dumps(summary, indent=1))
    return summary
