"""The ``memzoo`` console command.

    memzoo list                       # registry names and their config defaults
    memzoo demo                       # stream 100K tokens through two designs: state bytes, tokens/s
    memzoo passkey compare            # evaluate the shipped checkpoints side by side (the main job)
    memzoo passkey train --config recipes/configs/passkey/infini.yaml --out runs/passkey-infini
    memzoo passkey eval --checkpoint checkpoints/passkey-infini --max-length 1M
    memzoo passkey probe --checkpoint checkpoints/passkey-infini   # does the key reach the question? (seconds)
    memzoo recall train --config recipes/configs/recall/full.yaml --out runs/recall-full
    memzoo recall compare             # long-gap associative recall of checkpoints/recall-*, memory-off controls beside
    memzoo booksum train --config recipes/configs/booksum/infini.yaml --out runs/booksum-infini
    memzoo booksum compare            # ROUGE of checkpoints/booksum-* on held-out 64K-token synthetic books
    memzoo namm evolve --config recipes/configs/evolve/namm.yaml   # CMA-ES for the NAMM scorer, then ship it
    memzoo bench                      # tokens/s, peak RSS, state bytes, FLOP fraction per design -> runs/bench/

Every command writes under ``runs/`` unless given ``--out``: the repository's own results
(``docs/results/``) change only when the reproduce guide's commands name them.

Each sub-command is a small function below; long jobs live in ``recipes/`` and in the
``memzoo.tasks`` / ``memzoo.training`` packages, which the sub-commands call.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import os
import shlex
import sys
import time
from pathlib import Path

__all__ = ["main"]

#: errors a user's input causes (bad path, name, value): printed as one line, the traceback with --debug
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


# ----------------------------------------------------------------------------- argument types
# argparse calls these while parsing, so a bad value is refused before anything is imported or loaded.


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _depth(text: str) -> float:
    try:
        d = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= d <= 1.0:
        raise argparse.ArgumentTypeError(f"a depth is a fraction of the prompt in [0, 1] (0: start, 1: right before the question), got {d}")
    return d


def _length(text: str) -> str:
    from memzoo.units import parse_length

    try:
        parse_length(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _checkpoint(text: str) -> str:
    folder = Path(text)
    if not (folder / "config.json").is_file():
        if (folder / "model" / "config.json").is_file():  # a training run's save: its weights are in model/
            raise argparse.ArgumentTypeError(f"{text!r} is a training run's save, not a checkpoint: pass {str(folder / 'model')!r}")
        shipped = sorted(str(p) for p in Path("checkpoints").glob("*") if (p / "config.json").is_file())
        hint = f"; shipped ones: {', '.join(shipped)}" if shipped else " (run from the repository root to use the shipped ones)"
        close = difflib.get_close_matches(str(folder), shipped, n=1)
        hint = (f"; did you mean {close[0]!r}?" if close else "") + hint
        what = "no such folder" if not folder.exists() else "no config.json in it"
        raise argparse.ArgumentTypeError(f"{text!r} is not a memzoo checkpoint ({what}){hint}")
    return text


def _existing_file(text: str) -> str:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return text


def _checkpoint_design(folder: str | Path) -> str:
    """The registry name a checkpoint was saved with, from its ``config.json`` (no torch)."""
    return json.loads((Path(folder) / "config.json").read_text())["memory"]


def _catalog() -> dict:
    """The designs and their defaults, from the catalog the registry writes (``memzoo.registry.CATALOG``), without torch."""
    return json.loads(Path(__file__).with_name("catalog.json").read_text())


def _check_designs(names: list[str]) -> None:
    """Unknown registry names: one line with the did-you-mean, before any model is built (and before torch is
    imported: the names come from the catalog the registry writes)."""
    from memzoo.validation import unknown_name

    designs = _catalog()
    for name in names:
        if name not in designs:
            raise unknown_name("memory", name, list(designs))


def _cmd_list(args: argparse.Namespace) -> int:
    """The designs from the catalog the registry writes (no torch import), or from the registry with --live."""
    if args.live:
        from memzoo.registry import catalog

        designs = catalog()
    else:
        designs = _catalog()
    width = max(map(len, designs))
    cls_width = max(len(d["config"]) for d in designs.values())
    for name, d in designs.items():
        print(f"{name:{width}s}  {d['config']:{cls_width}s}  {json.dumps(d['defaults'])}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """Stream random tokens through each design; print state bytes and tokens/s as JSON lines."""
    _check_designs(args.designs)
    import torch

    import memzoo

    torch.manual_seed(0)
    for name in args.designs:
        model = memzoo.build(name, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads).eval()
        ids = torch.randint(3, 259, (1, args.tokens))
        start = time.perf_counter()
        out = model.stream(ids, segment_len=args.segment_len, progress=not args.quiet)
        seconds = time.perf_counter() - start
        row = {
            "design": name,
            "tokens": args.tokens,
            "state_bytes": out.state.nbytes(),
            "tokens_per_s": round(args.tokens / seconds),
            "seconds": round(seconds, 2),
        }
        print(json.dumps(row), flush=True)
    return 0


DEFAULT_LENGTHS = ["1K", "4K", "16K", "64K", "256K", "1M"]
DEFAULT_DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


def _parse_lengths(values: list[str], limit: str | None, what: str) -> list[int]:
    """Token counts from ``16K``-style strings, those above ``limit`` dropped; none left is an error naming the flags."""
    from memzoo.units import parse_length

    lengths = [parse_length(x) for x in values]
    if limit:
        lengths = [n for n in lengths if n <= parse_length(limit)]
    if not lengths:
        raise SystemExit(f"no {what}s left to evaluate: check --{what}s / --max-{what}")
    return lengths


def _lengths(args: argparse.Namespace) -> list[int]:
    return _parse_lengths(args.lengths, args.max_length, "length")


def _cmd_train(args: argparse.Namespace) -> int:
    """Train any recipe (passkey, booksum-synthetic, ...): the task comes from the config."""
    from memzoo.training.recipe import load_recipe, train_recipe

    recipe = load_recipe(args.config)
    overrides = {k: v for k, v in (("steps", args.steps), ("max_minutes", args.max_minutes)) if v is not None}
    out = args.out or f"runs/{recipe['name']}"
    with _distributed():
        summary = train_recipe(recipe, out, resume=not args.no_resume, progress=_rank() == 0, allow_changed=args.allow_changed,
                               **overrides)  # fmt: skip
    if _rank() == 0:
        print(json.dumps(summary, indent=1))
    return 0


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


@contextlib.contextmanager
def _distributed():
    """Under torchrun (WORLD_SIZE > 1) join the process group for the block (gloo for CPU tensors,
    nccl for CUDA ones) and leave it after; a plain run does nothing."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield
        return
    import torch
    import torch.distributed as dist

    joined = not dist.is_initialized()
    if joined:
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield
    finally:
        if joined:
            dist.destroy_process_group()


def _weights_sha256(path: str | Path) -> str:
    import hashlib

    return hashlib.sha256((Path(path) / "model.safetensors").read_bytes()).hexdigest()


def _reusable_cells(
    out_json: Path, weights: str, args: argparse.Namespace, lengths: list[int], *, memory_off: bool = False
) -> tuple[list[dict], list[str]]:
    """What an earlier run of the same weights and seed left in ``out_json``: its cells and commands.

    Kept: every cell of a length this call does not evaluate, and the cells of a length it does
    evaluate if they cover ``args.depths`` with ``args.n_keys`` keys (that length is then skipped).
    So long lengths can be run later, or with fewer keys, and land in the same results file.
    """
    if not out_json.is_file():
        return [], []
    earlier = json.loads(out_json.read_text())
    if earlier.get("weights_sha256") != weights or earlier.get("seed") != args.seed:
        return [], []
    if earlier.get("memory_off", False) != memory_off:
        return [], []  # a control's cells never stand in for the memory's, nor the other way round
    cells = [c for c in earlier.get("cells", []) if "prompt_tokens" in c]  # older files counted the prompt alone

    def finished(n: int) -> bool:
        mine = [c for c in cells if c["length"] == n and c["n"] == args.n_keys]
        return {c["depth"] for c in mine} >= set(args.depths)

    def reusable(c: dict) -> bool:
        return c["length"] not in lengths or (finished(c["length"]) and c["n"] == args.n_keys and c["depth"] in args.depths)

    kept = [c for c in cells if reusable(c)]
    return kept, list(earlier.get("commands", []))


def results_stem(checkpoint: str | Path, design: str, task: str = "passkey") -> str:
    """Name of a checkpoint's results file: the design, or the variant a shipped folder names
    (``checkpoints/passkey-namm-paper`` -> ``namm-paper``), so two checkpoints of one design keep
    separate results."""
    folder = Path(checkpoint).name
    return folder.removeprefix(f"{task}-") if folder.startswith(f"{task}-{design}-") else design


def _results_file(out: str | Path, checkpoint: str | Path, design: str, *, memory_off: bool = False) -> Path:
    """``OUT/<stem>.json`` of a checkpoint's passkey results, ``OUT/<stem>-memory-off.json`` of its control."""
    return Path(out) / f"{results_stem(checkpoint, design)}{'-memory-off' if memory_off else ''}.json"


def _load_for_eval(path: str, memory_off: bool) -> tuple:
    """``(model, control fields)`` of a checkpoint to evaluate (seeded), or ``(None, None)`` for the
    memory-off control of a design that keeps every token (``full``): it has none, and says so."""
    import torch

    import memzoo
    from memzoo.interface import describe_memory_off

    torch.manual_seed(0)
    model = memzoo.load(path)
    if not memory_off:
        return model, {}
    means = describe_memory_off(model)
    if means is None:
        print(f"{model.config.memory}: no memory-off control (it keeps every token it was given)")
        return None, None
    return model, {"memory_off": True, "memory_off_means": means}


def _part_cost(path: str, memory_off: bool, lengths: list[int]) -> float:
    """A checkpoint's relative evaluation cost for the whole job's ETA (:mod:`memzoo.progress`): its design's
    bench speed at these lengths; an eviction cache's control streams like ``window``, and ``full`` has none."""
    from memzoo.progress import stream_cost

    design = _checkpoint_design(path)
    if memory_off and design == "full":
        return 0.0
    if memory_off and "budget" in _catalog().get(design, {}).get("defaults", {}):
        design = "window"
    return stream_cost(design, lengths)


def _evaluate_all(paths: list[str], args: argparse.Namespace, evaluate, lengths: list[int]) -> list[dict]:
    """``evaluate(path, args, memory_off=...)`` for each checkpoint, then its control unless ``--no-control``,
    with the whole job's ETA (parts weighed by their designs' speeds at ``lengths``); the controls a design
    lacks (``full``) are left out."""
    from memzoo.progress import JobClock

    jobs = [(path, off) for path in paths for off in ([False, True] if args.control else [args.memory_off])]
    clock, results = JobClock({i: _part_cost(*job, lengths) for i, job in enumerate(jobs)}), []
    for i, (path, off) in enumerate(jobs):
        print(f"== [{i + 1}/{len(jobs)}] {path}{' (memory off)' if off else ''}{clock.status()}", flush=True)
        results.append(evaluate(path, args, memory_off=off))
        clock.finish(i)
    return [r for r in results if r is not None]


def _evaluate_checkpoint(path: str, args: argparse.Namespace, *, memory_off: bool = False) -> dict | None:
    """Evaluate one checkpoint on the passkey grid (or its memory-off control); results JSON + heatmap.

    Returns None for the control of a design with no memory to switch off (``full``)."""
    import contextlib

    import memzoo
    from memzoo.plots import passkey_heatmap
    from memzoo.tasks.passkey_eval import describe_keys, evaluate_passkey, save_results

    model, control = _load_for_eval(path, memory_off)
    if model is None:
        return None
    name = model.config.memory
    out_json = _results_file(args.out, path, name, memory_off=memory_off)
    weights = _weights_sha256(path)
    lengths = _lengths(args)
    kept, commands = _reusable_cells(out_json, weights, args, lengths, memory_off=memory_off) if args.resume else ([], [])
    todo = [n for n in lengths if n not in {c["length"] for c in kept}]
    if kept:
        print(f"{name}: keeping {len(kept)} cells of {out_json} (same weights and seed), evaluating lengths {todo}")
    if todo or not commands:  # a rerun that finds everything done measured nothing: not a command behind the results
        commands.append(_command_line(args))
    header = {"design": name, "checkpoint": str(path), "weights_sha256": weights, "seed": args.seed, "commands": commands} | control
    partial: dict = {"cells": list(kept)}

    def save_partial(cell: dict) -> None:  # a long grid keeps what it has if interrupted
        partial["cells"].append(cell)
        save_results(partial | header | describe_keys(partial["cells"]) | {"complete": False}, out_json)

    with memzoo.memory_off(model) if memory_off else contextlib.nullcontext():
        results = evaluate_passkey(
            model,
            lengths=todo,
            depths=args.depths,
            n_keys=args.n_keys,
            seed=args.seed,
            segment_len=args.segment_len,
            progress=not args.quiet,
            on_cell=save_partial,
        )
    cells = sorted(kept + results["cells"], key=lambda c: (c["length"], c["depth"]))
    results |= header | describe_keys(cells) | {"lengths": sorted({c["length"] for c in cells}), "cells": cells}
    results |= {"depths": sorted({c["depth"] for c in cells}), "complete": True, "parameters": sum(p.numel() for p in model.parameters())}
    save_results(results, out_json)
    passkey_heatmap(results, out_json.with_suffix(".png"))
    return results


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _print_table(all_results: list[dict]) -> None:
    """The accuracy grid, then what it takes to read it: memory (depths < 1) apart from local context
    (depth 1), state bytes and speed per design, each design's memory-off control on the line below it."""
    from memzoo.units import format_length

    def fmt(v: float | None, width: int = 6) -> str:
        return f"{v:{width}.2f}" if v is not None else f"{'-':>{width}s}"

    def design(r: dict) -> str:  # two checkpoints of one design (namm, namm-paper) stay apart
        return results_stem(r["checkpoint"], r["design"]) if r.get("checkpoint") else r["design"]

    shown = {design(r) for r in all_results if not r.get("memory_off")}
    controls = {design(r): r for r in all_results if r.get("memory_off") and design(r) in shown}
    # a control without its design's result (``passkey eval --memory-off``) is a row of its own
    results = sorted((r for r in all_results if not r.get("memory_off") or design(r) not in shown), key=design)

    def label(r: dict) -> str:
        return design(r) + (" (off)" if r.get("memory_off") else "")

    w = max([len("  memory off"), *(len(label(r)) for r in results)])  # the name column fits the longest name
    lengths = sorted({c["length"] for r in all_results for c in r["cells"]})
    columns = " ".join(f"{format_length(n):>6s}" for n in lengths)
    print(f"{'design':{w}s} {columns}   (accuracy, mean over depths)")
    for r in results:
        print(f"{label(r):{w}s} " + " ".join(fmt(_mean([c["accuracy"] for c in r["cells"] if c["length"] == n])) for n in lengths))
    print(
        "\nHow to read it: at depth 1 the needle sits right before the question, inside every design's local window, so a\n"
        "hit there is local context, not memory. Only the depths < 1 (the needle far back) test the memory, and only\n"
        "where they beat the memory-off control (the line below a design: its memory switched off, local context kept):\n"
    )
    print("accuracy at depths < 1 (memory) by length | at depth 1 (local context) | state MiB and tokens/s | what answers")
    print(f"{'design':{w}s} {columns}   {'depth 1':>7s}   {'state MiB':>9s}   {'tokens/s':>8s}   verdict")

    def accuracy_row(r: dict) -> str:
        far = " ".join(fmt(_mean([c["accuracy"] for c in r["cells"] if c["length"] == n and c["depth"] < 1])) for n in lengths)
        return f"{far}   {fmt(_mean([c['accuracy'] for c in r['cells'] if c['depth'] == 1]), 7)}"

    for r in results:
        longest = [c for c in r["cells"] if c["length"] == max(c["length"] for c in r["cells"])]
        state = max((c.get("state_bytes", 0) for c in longest), default=0)
        speed = _mean([c["tokens_per_s"] for c in longest if "tokens_per_s" in c])
        verdict = "" if r.get("memory_off") else "   " + _verdict(r, controls.get(design(r)))
        print(f"{label(r):{w}s} {accuracy_row(r)}   {state / 2**20:9.1f}   {speed or 0:8,.0f}{verdict}")
        if r.get("memory_off"):
            continue
        if design(r) in controls:
            print(f"{'  memory off':{w}s} {accuracy_row(controls[design(r)])}")
        elif controls:  # some controls were measured: say why this one has none
            print(f"{'  memory off':{w}s} (none: {'it keeps every token' if r['design'] == 'full' else 'not measured'})")
    measured = any(r.get("memory_off") for r in all_results)
    note = "" if measured else "; no memory-off control measured (memzoo passkey compare measures it unless --no-control)"
    print(f"(state and tokens/s at each design's longest length, batch 1{note})")


def _verdict(result: dict, control: dict | None, margin: float = 0.1) -> str:
    """What answers a design's passkey cells, in words: its memory where some length's depths < 1 beat the
    memory-off control by more than ``margin``; local context where only depth 1 is answered."""
    from memzoo.units import format_length

    def far(r: dict, n: int) -> float:
        return _mean([c["accuracy"] for c in r["cells"] if c["length"] == n and c["depth"] < 1]) or 0.0

    lengths = sorted({c["length"] for c in result["cells"] if c["depth"] < 1})
    local = _mean([c["accuracy"] for c in result["cells"] if c["depth"] == 1]) or 0.0
    if control is None:
        beyond = [n for n in lengths if far(result, n) > margin]
        return f"depths < 1 answered to {format_length(beyond[-1])} (no control)" if beyond else (
            "local context only" if local > margin else "nothing")  # fmt: skip
    wins = [n for n in lengths if far(result, n) > far(control, n) + margin]
    if wins:
        return f"memory (beats its control to {format_length(wins[-1])})"
    return "local context only" if local > margin else "nothing"


def _cmd_derive(args: argparse.Namespace) -> int:
    _check_designs([args.memory])
    import memzoo

    overrides = {}
    for item in args.set or []:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value) if value[:1] in "0123456789-[{tfn" else value
    source = memzoo.load(args.source)
    model = memzoo.swap_memory(source, args.memory, **overrides)
    if args.scorer:
        from memzoo.memories.namm import load_namm_parameters, set_namm_parameters

        set_namm_parameters(model, load_namm_parameters(args.scorer))
    stored = _stored_dtype(args.bf16)
    model.save_pretrained(args.out, dtype=stored)
    info = {"derived_from": str(args.source), "command": _command_line(args), "stored_dtype": "bfloat16" if stored else "float32"}
    if args.scorer:
        info["scorer"] = str(args.scorer)
    source_training = Path(args.source) / "training.json"
    task = json.loads(source_training.read_text()).get("task") if source_training.is_file() else None
    if task:  # the card of a derived checkpoint describes the source's task
        info["task"] = task
    _write_training(args.out, info)
    print(f"wrote {args.out}: {args.memory} {overrides} on the weights of {args.source}")
    return 0


def _command_line(args: argparse.Namespace | None = None) -> str:
    """The command that is running, for provenance: ``memzoo`` + the arguments ``main`` parsed (the same from a recipe script)."""
    if args is not None and getattr(args, "argv", None) is not None:
        return "memzoo " + shlex.join(args.argv)
    return "memzoo " + " ".join(sys.argv[1:]) if Path(sys.argv[0]).name == "memzoo" else " ".join(["python", *sys.argv])


def _stored_dtype(bf16: bool):
    import torch

    return torch.bfloat16 if bf16 else None


def _write_training(checkpoint: str | Path, info: dict) -> None:
    from memzoo.io import write_text_atomic

    write_text_atomic(Path(checkpoint) / "training.json", json.dumps(info, indent=1))


def _cmd_ship(args: argparse.Namespace) -> int:
    """Copy a finished run's model into a shipped checkpoint folder with its training record."""
    import memzoo
    from memzoo.bench import cpu_flags
    from memzoo.training.budget import chain_totals, task_curriculum, warm_chain
    from memzoo.training.recipe import curriculum_tokens, load_recipe

    run = Path(args.run)
    summary = json.loads((run / "run.json").read_text())
    recipe = load_recipe(args.config)
    warm = summary.get("warm_start")  # every stage behind the source (older runs kept none: read it before out changes)
    chain = (warm.get("chain") or warm_chain(warm["source"])) if warm else []
    model = memzoo.load(run / "model")
    stored = _stored_dtype(args.bf16)
    model.save_pretrained(args.out, dtype=stored)
    curriculum = recipe["task"].get("curriculum", [])
    info = summary | {
        "recipe_file": args.config,
        "command": f"memzoo {args.command} train --config {args.config} --out {args.run}",
        "task": recipe["task"]["name"],
        "curriculum": curriculum,
        # the budget the comparison counts: optimiser steps x tokens per step (this run's own)
        "tokens": summary.get("tokens") or curriculum_tokens(task_curriculum(recipe["task"]), summary["steps"], summary["train"]["steps"]),
        "shipped_on": {"cpu_flags": cpu_flags()},  # the CPUs that trained it are the run's "machines"
        "stored_dtype": "bfloat16" if stored else "float32",
        "notes": recipe.get("notes", ""),
    }
    if warm:  # what the source cost: warm starts count in the budget
        info["warm_start"] = warm | {"chain": chain, "source_train_seconds": chain_totals(chain)["train_seconds"]}
        if Path(warm["source"]).resolve() == Path(args.out).resolve():  # a later stage shipped over its own warm start
            info["warm_start"]["source_note"] = "the earlier checkpoint at this path, which this one replaces"
    _write_training(args.out, info)
    print(f"wrote {args.out} from {run}")
    return 0


def _default_results(checkpoint: str | Path, task: str) -> Path:
    """The committed results of a shipped checkpoint: ``docs/results/<task>/<stem>.json`` of the repository
    its ``checkpoints/`` folder sits in (``checkpoints/recall-namm`` -> ``docs/results/recall/namm.json``)."""
    folder = Path(checkpoint)
    design = _checkpoint_design(folder)
    record = folder / "training.json"
    trained_on = json.loads(record.read_text()).get("task") if record.is_file() else None
    results = "booksum-events" if trained_on == "booksum-synthetic" else task  # books with known events have their own folder
    found = folder.resolve().parent.parent / "docs" / "results" / results / f"{results_stem(folder, design, task)}.json"
    with contextlib.suppress(ValueError):  # relative to the working folder where it lies below it (the card cites it)
        found = found.relative_to(Path.cwd())
    return found


def _cmd_card(args: argparse.Namespace) -> int:
    from memzoo.cards import write_card

    results = args.results
    if results is None:
        found = _default_results(args.checkpoint, args.task)
        results = found if found.is_file() else None
        print(f"results: {found}" if results else f"no results at {found}: the card says 'not measured yet' (pass --results FILE)")
    print(f"wrote {write_card(args.checkpoint, results)}")
    return 0


def _evaluate_and_report(args: argparse.Namespace, evaluate, print_table, results_file, also: str = "") -> int:
    """``memzoo passkey|recall eval``: evaluate one checkpoint (or its memory-off control), print, say where it went."""
    results = evaluate(args.checkpoint, args, memory_off=args.memory_off)
    if results is None:
        raise ValueError(f"{args.checkpoint} keeps every token: it has no memory-off control (drop --memory-off)")
    print_table([results])
    print(f"wrote {results_file(args.out, args.checkpoint, results['design'], memory_off=args.memory_off)}{also}")
    return 0


def _cmd_passkey_eval(args: argparse.Namespace) -> int:
    return _evaluate_and_report(args, _evaluate_checkpoint, _print_table, _results_file, also=" and .png")


def _cmd_passkey_probe(args: argparse.Namespace) -> int:
    import contextlib

    import memzoo
    from memzoo.plots import format_length
    from memzoo.tasks.passkey_eval import probe_passkey, save_results

    model = memzoo.load(args.checkpoint)
    with memzoo.memory_off(model) if args.memory_off else contextlib.nullcontext():
        results = probe_passkey(model, lengths=_lengths(args), depths=args.depths, n_rows=args.rows, seed=args.seed,
                                segment_len=args.segment_len, progress=not args.quiet)  # fmt: skip
    results["memory_off"] = args.memory_off
    chance = results["chance_ce"]
    title = f"{results['design']}{' (memory off)' if args.memory_off else ''}"
    print(f"{title}: answer cross-entropy (nats, chance {chance:.2f}) / exact, teacher-forced, {args.rows} rows per cell")

    def grid(text) -> None:  # one line per length, one column per depth
        for n in sorted({c["length"] for c in results["cells"]}):
            row = {c["depth"]: c for c in results["cells"] if c["length"] == n}
            print(f"{format_length(n):>7s} " + " ".join(f"{text(row[d]):>14s}" for d in args.depths))

    print(f"{'length':>7s} " + " ".join(f"{'depth ' + format(d, 'g'):>14s}" for d in args.depths))
    grid(lambda c: f"{c['answer_ce']:.2f} / {c['exact']:4.2f}")
    if any("needle_kept" in c for c in results["cells"]):
        print("needle tokens still in the cache when the answer starts, per layer (mean over rows and heads)")
        grid(lambda c: "/".join(f"{x:.2f}" for x in c["needle_kept"]))
    if args.out:
        print(f"wrote {save_results(results | {'checkpoint': str(args.checkpoint), 'command': _command_line(args)}, args.out)}")
    return 0


def _cmd_passkey_compare(args: argparse.Namespace) -> int:
    from memzoo.plots import passkey_comparison

    paths = args.checkpoints or sorted(str(p) for p in Path("checkpoints").glob("passkey-*") if (p / "config.json").is_file())
    if not paths:
        raise SystemExit("no checkpoints found: pass --checkpoints DIR [DIR ...] or run from the repository root")
    if args.full_grid:
        args.lengths, args.depths, args.n_keys = DEFAULT_LENGTHS, DEFAULT_DEPTHS, max(args.n_keys, 5)
    all_results = _evaluate_all(paths, args, _evaluate_checkpoint, _lengths(args))
    labels = [Path(r.get("checkpoint", r["design"])).name.removeprefix("passkey-") for r in all_results]
    figure = passkey_comparison(all_results, Path(args.out) / "comparison.png", labels=labels)
    _print_table(all_results)
    print(f"wrote {len(all_results)} results JSON, heatmaps and {figure} under {args.out}")
    return 0


# ----------------------------------------------------------------------------- recall


def _recall_file(out: str | Path, checkpoint: str | Path, design: str, *, memory_off: bool = False) -> Path:
    """``OUT/<stem>.json`` of a checkpoint's recall results, ``OUT/<stem>-memory-off.json`` of its control."""
    return Path(out) / f"{results_stem(checkpoint, design, 'recall')}{'-memory-off' if memory_off else ''}.json"


def _gaps(args: argparse.Namespace) -> list[int]:
    return _parse_lengths(args.gaps, args.max_gap, "gap")


def _evaluate_recall_checkpoint(path: str, args: argparse.Namespace, *, memory_off: bool = False) -> dict | None:
    """Evaluate one checkpoint on long-gap recall (or its memory-off control); results JSON.

    Cells of an earlier run with the same weights, seed, ks and queries are kept, and their (gap,
    variant) pairs skipped, so long gaps can be added later to the same file. Returns None for the
    control of a design with no memory to switch off (``full``)."""
    import memzoo
    from memzoo.tasks.passkey_eval import save_results
    from memzoo.tasks.recall import KEY_LEN, VALUE_LEN, evaluate_recall

    model, control = _load_for_eval(path, memory_off)
    if model is None:
        return None
    name = model.config.memory
    out_json = _recall_file(args.out, path, name, memory_off=memory_off)
    weights = _weights_sha256(path)
    same = {"weights_sha256": weights, "seed": args.seed, "ks": args.ks, "min_queries": args.min_queries, "memory_off": memory_off}
    earlier = json.loads(out_json.read_text()) if args.resume and out_json.is_file() else {}
    kept = earlier.get("cells", []) if all(earlier.get(key, False if key == "memory_off" else None) == v for key, v in same.items()) else []
    done = {(c["gap"], c["variant"]) for c in kept}
    todo = [(g, v) for v in args.variants for g in _gaps(args) if (g, v) not in done]
    commands = list(earlier.get("commands", [])) if kept else []
    if kept:
        print(f"{name}: keeping {len(kept)} cells of {out_json} (same weights, seed, ks and queries)")
    if todo or not commands:
        commands.append(_command_line(args))
    header = {"design": name, "checkpoint": str(path), "commands": commands} | same | control
    cells = list(kept)

    def save_partial(cell: dict) -> None:  # a long evaluation keeps what it has if interrupted
        cells.append(cell)
        save_results({"cells": cells} | header | {"complete": False}, out_json)

    with memzoo.memory_off(model) if memory_off else contextlib.nullcontext():
        for variant in args.variants:
            gaps = [g for g, v in todo if v == variant]
            if gaps:
                results = evaluate_recall(model, gaps=gaps, ks=args.ks, variants=[variant], min_queries=args.min_queries, seed=args.seed,
                                          segment_len=args.segment_len, progress=not args.quiet, on_cell=save_partial)  # fmt: skip
    cells.sort(key=lambda c: (c["variant"] != "standard", c["gap"], c["k"]))
    results = header | {
        "gaps": sorted({c["gap"] for c in cells}),
        "variants": sorted({c["variant"] for c in cells}, key=lambda v: v != "standard"),
        "key_len": KEY_LEN,
        "value_len": VALUE_LEN,
        "chance": 10.0**-VALUE_LEN,
        "cells": cells,
        "complete": True,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    save_results(results, out_json)
    return results


def _print_recall_table(all_results: list[dict]) -> None:
    """Per variant and k: query accuracy by gap, each design's memory-off control on the line below it."""
    from memzoo.units import format_length

    def design(r: dict) -> str:
        return results_stem(r["checkpoint"], r["design"], "recall") if r.get("checkpoint") else r["design"]

    controls = {design(r): r for r in all_results if r.get("memory_off")}
    results = sorted((r for r in all_results if not r.get("memory_off")), key=design)
    results += [r for r in all_results if r.get("memory_off") and design(r) not in {design(x) for x in results}]
    w = max([len("  memory off"), *(len(design(r)) + 6 for r in results)])
    gaps = sorted({c["gap"] for r in all_results for c in r["cells"]})
    ks = sorted({c["k"] for r in all_results for c in r["cells"]})
    variants = sorted({c["variant"] for r in all_results for c in r["cells"]}, key=lambda v: v != "standard")

    def row(r: dict, variant: str, k: int) -> str:
        acc = {c["gap"]: c["accuracy"] for c in r["cells"] if c["variant"] == variant and c["k"] == k}
        return " ".join(f"{acc[g]:6.2f}" if g in acc else f"{'-':>6s}" for g in gaps)

    chance = min(r.get("chance", 1.0) for r in all_results)
    print(f"query accuracy (every value character right; chance {chance:g}) by gap between the pairs and the queries")
    for variant in variants:
        for k in ks:
            print(f"\n{variant}, {k} pair{'s' if k > 1 else ''}")
            print(f"{'design':{w}s} " + " ".join(f"{format_length(g):>6s}" for g in gaps) + "   state MiB")
            for r in results:
                state = max((c["state_bytes"] for c in r["cells"]), default=0) / 2**20
                label = design(r) + (" (off)" if r.get("memory_off") else "")
                print(f"{label:{w}s} {row(r, variant, k)}   {state:9.1f}")
                if not r.get("memory_off") and design(r) in controls:
                    print(f"{'  memory off':{w}s} {row(controls[design(r)], variant, k)}")
    print("\n(state bytes per sequence at each design's longest gap; memory off: the Infini/Titans read zeroed,"
          " an eviction cache reduced to its recent window)")


def _cmd_recall_eval(args: argparse.Namespace) -> int:
    return _evaluate_and_report(args, _evaluate_recall_checkpoint, _print_recall_table, _recall_file)


def _cmd_recall_compare(args: argparse.Namespace) -> int:
    from memzoo.plots import recall_comparison, recall_state

    paths = args.checkpoints or sorted(str(p) for p in Path("checkpoints").glob("recall-*") if (p / "config.json").is_file())
    if not paths:
        raise SystemExit("no checkpoints found: pass --checkpoints DIR [DIR ...] or run from the repository root")
    all_results = _evaluate_all(paths, args, _evaluate_recall_checkpoint, _gaps(args))
    labels = [results_stem(r["checkpoint"], r["design"], "recall") for r in all_results]
    figures = [recall_comparison(all_results, Path(args.out) / f"comparison-{v}.png", labels=labels, variant=v) for v in args.variants]
    gap = max(g for g in _gaps(args) if g <= 16384) if min(_gaps(args)) <= 16384 else min(_gaps(args))
    k = 16 if 16 in args.ks else max(args.ks)
    figures.append(recall_state(all_results, Path(args.out) / "state.png", labels=labels, gap=gap, k=k))
    _print_recall_table(all_results)
    print(f"wrote {len(all_results)} results JSON and {', '.join(str(f) for f in figures)}")
    return 0


def _add_recall_options(p: argparse.ArgumentParser, gaps: list[str], out: str) -> None:
    p.add_argument("--gaps", nargs="+", type=_length, default=gaps,
                   help=f"gaps between pairs and queries, e.g. 4K 1M (default {' '.join(gaps)})")  # fmt: skip
    p.add_argument("--max-gap", type=_length, default=None, help="drop gaps above this (e.g. 16K)")
    p.add_argument("--ks", nargs="+", type=_positive_int, default=[1, 4, 16, 64], help="pairs per row")
    p.add_argument("--variants", nargs="+", choices=["standard", "overwrite"], default=["standard"],
                   help="overwrite: an update block halfway through the gap reassigns a quarter of the keys")  # fmt: skip
    p.add_argument("--min-queries", type=_positive_int, default=8, help="queries per (gap, k) at least: ceil(this / k) rows of each k")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--segment-len", type=_positive_int, default=2048, help="tokens per forward call while streaming")
    p.add_argument("--out", default=out, help="folder for results JSON and figures")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--memory-off", action="store_true", help="evaluate the memory-off control instead (results <design>-memory-off.json)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the finished (gap, variant) cells of OUT/<design>.json of the same weights, seed, ks, queries")  # fmt: skip


# ----------------------------------------------------------------------------- booksum


def _booksum_books(args: argparse.Namespace) -> tuple[list, dict]:
    """The books to evaluate on (held-out synthetic ones, or BookSum) and their description for the results JSON."""
    if args.data == "booksum":
        from memzoo.tasks.booksum import load_booksum

        books = load_booksum(args.split, level=args.level, path=args.path, limit=args.limit)
        return books, {"source": "booksum", "path": args.path, "split": args.split, "level": args.level, "limit": args.limit}
    from memzoo.tasks.booksum_eval import synthetic_books
    from memzoo.units import parse_length

    lengths, seeds = [parse_length(x) for x in args.lengths], list(range(args.seed, args.seed + args.n_books))
    books = [b for n in lengths for b in synthetic_books(n, seeds, n_events=args.n_events, n_chapters=args.n_chapters)]
    data = {"source": "synthetic", "lengths": lengths, "seeds": seeds, "n_events": args.n_events}
    return books, data | ({} if args.n_chapters is None else {"n_chapters": args.n_chapters})


def _decoding(args: argparse.Namespace) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "do_sample": args.sample, "temperature": args.temperature, "top_p": args.top_p}


def _evaluate_booksum_model(books: list, data: dict, args: argparse.Namespace, *, checkpoint: str | None = None) -> dict:
    """Evaluate a memzoo checkpoint, or ``args.hf`` with an EvictingCache; results JSON saved (partially, book by book)."""
    import torch

    from memzoo.tasks.passkey_eval import save_results

    torch.manual_seed(0)
    if checkpoint is not None:
        import memzoo
        from memzoo.tasks.booksum_eval import evaluate_booksum

        model = memzoo.load(checkpoint)
        name, source = args.name or model.config.memory, {"checkpoint": str(checkpoint)}

        def run(on_book):
            return evaluate_booksum(model, books, segment_len=args.segment_len, seed=args.seed, progress=not args.quiet,
                                    on_book=on_book, name=name, **_decoding(args))  # fmt: skip
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from memzoo.hf import EvictingCache
        from memzoo.tasks.booksum_eval import evaluate_booksum_hf

        model, tokenizer = AutoModelForCausalLM.from_pretrained(args.hf), AutoTokenizer.from_pretrained(args.hf)
        kwargs = {} if args.cache == "full" else {"budget": args.budget, "evict_every": args.evict_every}
        name = args.name or f"hf-{model.config.model_type}-{args.cache}"
        source = {"hf_model": args.hf, "cache_policy": args.cache, **kwargs}

        def run(on_book):
            return evaluate_booksum_hf(model, tokenizer, books, cache_factory=lambda: EvictingCache(args.cache, **kwargs), seed=args.seed,
                                       progress=not args.quiet, on_book=on_book, name=name, **_decoding(args))  # fmt: skip

    out_json = Path(args.out) / f"{name}.json"
    partial: list[dict] = []

    def save_partial(book: dict) -> None:  # a long evaluation keeps what it has if interrupted
        partial.append(book)
        save_results({"model": name, **source, "data": data, "books": partial, "complete": False}, out_json)

    results = run(save_partial) | source | {"data": data, "command": _command_line(args), "complete": True}
    save_results(results, out_json)
    print(f"wrote {out_json}", flush=True)
    return results


def _print_rouge_table(all_results: list[dict]) -> None:
    """A markdown table: ROUGE-1/2/L F1 and overall (x100) per model, streaming speed and memory."""
    print("| model | books | R-1 | R-2 | R-L | overall | event recall | tokens/s | state bytes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in all_results:
        g, recall = r["rouge"], r.get("event_recall")
        state = max((b.get("state_bytes", b.get("cache_tokens", 0)) for b in r["books"]), default=0)
        print(f"| {r['model']} | {r['n_books']} | {g['rouge1']:.2f} | {g['rouge2']:.2f} | {g['rougeL']:.2f} | {g['overall']:.2f} "
              f"| {'-' if recall is None else f'{recall:.2f}'} | {r['tokens_per_s']} | {state} |")  # fmt: skip


def _cmd_booksum_eval(args: argparse.Namespace) -> int:
    if (args.checkpoint is None) == (args.hf is None):
        raise SystemExit("give exactly one of --checkpoint (a memzoo model) or --hf (a transformers causal LM)")
    books, data = _booksum_books(args)
    _print_rouge_table([_evaluate_booksum_model(books, data, args, checkpoint=args.checkpoint)])
    return 0


def _cmd_booksum_compare(args: argparse.Namespace) -> int:
    paths = args.checkpoints or sorted(str(p) for p in Path("checkpoints").glob("booksum-*") if (p / "config.json").is_file())
    if not paths:
        raise SystemExit("no checkpoints found: pass --checkpoints DIR [DIR ...] or run from the repository root")
    from memzoo.progress import JobClock

    books, data = _booksum_books(args)  # the same books for every checkpoint
    lengths = [len(b.text) for b in books] if data["source"] == "booksum" else [n for n in data["lengths"] for _ in data["seeds"]]
    clock, all_results = JobClock({i: _part_cost(path, False, lengths) for i, path in enumerate(paths)}), []
    for i, path in enumerate(paths):
        print(f"== [{i + 1}/{len(paths)}] {path}{clock.status()}", flush=True)
        all_results.append(_evaluate_booksum_model(books, data, args, checkpoint=path))
        clock.finish(i)
    _print_rouge_table(all_results)
    return 0


# ----------------------------------------------------------------------------- namm


def _cmd_namm_evolve(args: argparse.Namespace) -> int:
    """Evolve a NAMM scorer (CMA-ES) for a trained backbone, under torchrun too; rank 0 ships it."""
    from memzoo.training.evolution import evolve_namm, load_evolve_config

    config = load_evolve_config(args.config)
    overrides = {k: v for k, v in (("generations", args.generations), ("max_minutes", args.max_minutes)) if v is not None}
    with _distributed():
        summary = evolve_namm(config, out=args.out, resume=not args.no_resume, progress=_rank() == 0 and not args.quiet,
                              command=_command_line(args), export=not args.no_export, allow_changed=args.allow_changed,
                              **overrides)  # fmt: skip
    if _rank() == 0:
        print(json.dumps(summary, indent=1))
    return 0


def _cmd_namm_export(args: argparse.Namespace) -> int:
    from memzoo.training.evolution import export_namm, load_evolve_config

    scorer, checkpoint = export_namm(load_evolve_config(args.config), args.run)
    print(f"wrote {scorer} and {checkpoint}")
    return 0


def _cmd_namm_compare(args: argparse.Namespace) -> int:
    from memzoo.io import write_text_atomic
    from memzoo.tasks.passkey_eval import save_results
    from memzoo.training.evolution import compare_policies, load_evolve_config

    _check_designs(args.designs)
    config = load_evolve_config(args.config)
    results = compare_policies(config, args.checkpoint, args.designs, n_prompts=args.n_prompts, tasks=args.tasks)
    results["command"] = _command_line(args)
    path = save_results(results, Path(args.out) / "compare.json")
    lines = ["| design | " + " | ".join(f"{t} score | {t} / full | {t} acc | {t} tok/s" for t in args.tasks) + " |",
             "|---" * (1 + 4 * len(args.tasks)) + "|"]  # fmt: skip
    for d, row in results["designs"].items():
        cells = [f"{r['score']:.3g} | {r['ratio_to_full']:.3f} | {r['accuracy']:.2f} | {r['tokens_per_s']}"
                 for r in (row[t] for t in args.tasks)]  # fmt: skip
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    write_text_atomic(path.with_suffix(".md"), f"Generated by `{results['command']}` from `{path.name}`.\n\n{table}\n")
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


def _add_booksum_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", choices=["synthetic", "booksum"], default="synthetic", help="held-out synthetic books, or BookSum")
    p.add_argument("--lengths", nargs="+", type=_length, default=["64K"], help="synthetic book lengths, e.g. 4096 64K (default 64K)")
    p.add_argument("--n-books", type=_positive_int, default=3, help="synthetic books per length (seeds SEED .. SEED+N-1)")
    p.add_argument("--n-events", type=_positive_int, default=4, help="key events per synthetic book (as in the shipped recipes)")
    p.add_argument("--n-chapters", type=_positive_int, default=None,
                   help="chapters per synthetic book (default 2 x events; one event per chapter: = --n-events)")  # fmt: skip
    p.add_argument("--path", default=None, help="BookSum: local files in the BookSum schema (default: the Hub)")
    p.add_argument("--split", default="test", help="BookSum split")
    p.add_argument("--level", choices=["chapter", "book"], default="chapter", help="BookSum level")
    p.add_argument("--limit", type=_positive_int, default=None, help="BookSum: first N examples")
    p.add_argument("--seed", type=int, default=0, help="first synthetic book seed (held out: training seeds are >= 2**32); sampling seed")
    p.add_argument("--max-new-tokens", type=_positive_int, default=None, help="decoding budget (default: each reference's length)")
    p.add_argument("--sample", action="store_true", help="nucleus sampling instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.5, help="with --sample (the Infini-attention paper's 0.5)")
    p.add_argument("--top-p", type=float, default=0.95, help="with --sample (the paper's 0.95)")
    p.add_argument("--segment-len", type=_positive_int, default=2048, help="tokens per forward call while streaming")
    p.add_argument("--name", default=None, help="the results' name (default: the design; JSON at OUT/NAME.json)")
    p.add_argument("--out", default="runs/booksum", help="folder for results JSON (the docs' own: docs/results/booksum)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_eval_options(p: argparse.ArgumentParser, lengths: list[str], depths: list[float], n_keys: int, out: str) -> None:
    p.add_argument("--lengths", nargs="+", type=_length, default=lengths, help=f"prompt lengths, e.g. 4K 1M (default {' '.join(lengths)})")
    p.add_argument("--max-length", type=_length, default=None, help="drop lengths above this (e.g. 1M)")
    p.add_argument("--depths", nargs="+", type=_depth, default=depths, help="needle depths in [0, 1]")
    p.add_argument("--n-keys", type=_positive_int, default=n_keys, help="keys per cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--segment-len", type=_positive_int, default=2048, help="tokens per forward call while streaming")
    p.add_argument("--out", default=out, help="folder for results JSON and figures")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--memory-off",
        action="store_true",
        help="evaluate the memory-off control instead (each design keeps only its local context; results <design>-memory-off.json)",
    )
    p.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the finished lengths of OUT/<design>.json when it was made with the same weights, keys and depths",
    )


def _add_run_commands(group, task: str) -> None:
    """The task-independent sub-commands of a task group: train, derive, ship, card."""
    p = group.add_parser("train", help="train a model from a recipe config (resumes from OUT/last)")
    p.add_argument("--config", required=True, type=_existing_file, help=f"recipe YAML, e.g. recipes/configs/{task}/infini.yaml")
    p.add_argument("--out", default=None, help="run folder (default runs/<recipe name>)")
    p.add_argument("--steps", type=_positive_int, default=None, help="override train.steps")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this wall time")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT/last exists")
    p.add_argument(
        "--allow-changed",
        action="store_true",
        help="resume OUT/last although the config changed since it was saved (each change is named and recorded)",
    )
    p.set_defaults(func=_cmd_train)

    p = group.add_parser("derive", help="save a checkpoint's weights with another KV design (e.g. full -> h2o)")
    p.add_argument("--from", dest="source", required=True, type=_checkpoint, help="checkpoint folder")
    p.add_argument("--memory", required=True, help="registry name of the new design")
    p.add_argument("--set", nargs="*", help="design options as KEY=VALUE, e.g. budget=512 evict_every=256")
    p.add_argument("--out", required=True)
    p.add_argument("--bf16", action="store_true", help="store weights in bf16 (half the size)")
    p.add_argument("--scorer", default=None, help="namm only: an evolved scorer (file or folder) to load, e.g. checkpoints/namm-scorer")
    p.set_defaults(func=_cmd_derive)

    p = group.add_parser("ship", help="copy a finished training run into a checkpoint folder with its training record")
    p.add_argument("--run", required=True, help=f"run folder of `memzoo {task} train`")
    p.add_argument("--config", required=True, type=_existing_file, help="the recipe YAML it was trained with")
    p.add_argument("--out", required=True, help=f"e.g. checkpoints/{task}-infini")
    p.add_argument("--bf16", action="store_true", help="store weights in bf16 (half the size)")
    p.set_defaults(func=_cmd_ship)

    p = group.add_parser("card", help="(re)write a checkpoint's model card from its training.json and results JSON")
    p.add_argument("--checkpoint", required=True, type=_checkpoint)
    p.add_argument("--results", default=None, type=_existing_file,
                   help=f"{task} results JSON of this checkpoint (default: docs/results/{task}/<design>.json)")  # fmt: skip
    p.set_defaults(func=_cmd_card, task=task)


# ----------------------------------------------------------------------------- bench


def _cmd_bench(args: argparse.Namespace) -> int:
    """Speed and memory of every design (+ the public peers): JSON and figures under OUT, a table on stdout."""
    from memzoo.bench import format_table, load_config, parse_length, run_bench, summarize

    _check_designs(args.designs or [])
    cfg = load_config(args.config, quick=args.quick)
    if args.threads:
        cfg["threads"] = args.threads
    if args.lengths:  # only these stream lengths (no estimate from a shorter one: each given length is measured)
        cfg["stream"] = cfg["stream"] | {"lengths": args.lengths, "short_max": max(args.lengths, key=parse_length)}
    out = args.out or ("runs/bench-quick" if args.quick else "runs/bench")
    data = run_bench(cfg, out, designs=args.designs, sections=args.sections, fresh=args.fresh, peers_python=args.peers_python,
                     command=_command_line(args))  # fmt: skip
    print(format_table(data))
    print(json.dumps(summarize(data), indent=1))
    print(f"wrote {Path(out) / 'bench.json'} and figures")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memzoo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Add --debug anywhere to see the traceback of an error.")  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list the memory designs and their defaults")
    p.add_argument("--live", action="store_true", help="ask the registry itself (imports torch; includes designs registered at run time)")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("demo", help="stream a long random input through designs; print state bytes and tokens/s")
    p.add_argument("--designs", nargs="+", default=["window", "sinks"], help="registry names (default: window sinks)")
    p.add_argument("--tokens", type=_positive_int, default=100_000)
    p.add_argument("--segment-len", type=_positive_int, default=2048)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)

    passkey = sub.add_parser("passkey", help="passkey retrieval: train, evaluate, compare").add_subparsers(dest="action", required=True)
    _add_run_commands(passkey, "passkey")

    p = passkey.add_parser("eval", help="accuracy grid of one checkpoint (JSON + heatmap)")
    p.add_argument("--checkpoint", required=True, type=_checkpoint)
    _add_eval_options(p, DEFAULT_LENGTHS, DEFAULT_DEPTHS, 5, "runs/passkey-eval")
    p.set_defaults(func=_cmd_passkey_eval)

    p = passkey.add_parser("probe", help="teacher-forced answer cross-entropy by length and depth: does the key reach the question?")
    p.add_argument("--checkpoint", required=True, type=_checkpoint)
    p.add_argument("--lengths", nargs="+", type=_length, default=["512", "1K", "4K"], help="row lengths, answer included")
    p.add_argument("--max-length", type=_length, default=None, help="drop lengths above this")
    p.add_argument("--depths", nargs="+", type=_depth, default=DEFAULT_DEPTHS, help="needle depths in [0, 1]")
    p.add_argument("--rows", type=_positive_int, default=8, help="prompts (keys) per cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--segment-len", type=_positive_int, default=2048, help="tokens per forward call while streaming")
    p.add_argument("--out", default=None, help="also write the results to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--memory-off", action="store_true", help="probe the memory-off control (each design keeps only its local context)")
    p.set_defaults(func=_cmd_passkey_probe)

    p = passkey.add_parser("compare", help="evaluate several checkpoints side by side (default: checkpoints/passkey-*)")
    p.add_argument("--checkpoints", nargs="+", type=_checkpoint, default=None)
    p.add_argument("--full-grid", action="store_true", help="lengths 1K..1M x 5 depths x 5 keys (hours on a CPU)")
    _add_eval_options(p, ["1K", "4K"], [0.0, 0.5, 1.0], 2, "runs/passkey-compare")
    p.add_argument(
        "--control",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also evaluate each checkpoint with its memory off, printed on the line below it (--no-control: skip)",
    )
    p.set_defaults(func=_cmd_passkey_compare)

    recall = sub.add_parser("recall", help="long-gap associative recall (MQAR): train, evaluate, compare")
    recall = recall.add_subparsers(dest="action", required=True)
    _add_run_commands(recall, "recall")

    p = recall.add_parser("eval", help="query accuracy of one checkpoint by gap, pairs and variant (JSON)")
    p.add_argument("--checkpoint", required=True, type=_checkpoint)
    _add_recall_options(p, ["1K", "4K", "16K", "64K", "256K", "1M"], "runs/recall-eval")
    p.set_defaults(func=_cmd_recall_eval)

    p = recall.add_parser("compare", help="recall of checkpoints side by side, memory-off controls beside (default: checkpoints/recall-*)")
    p.add_argument("--checkpoints", nargs="+", type=_checkpoint, default=None)
    _add_recall_options(p, ["1K", "4K"], "runs/recall-compare")
    p.add_argument("--control", action=argparse.BooleanOptionalAction, default=True,
                   help="also evaluate each checkpoint with its memory off, printed on the line below it (--no-control: skip)")  # fmt: skip
    p.set_defaults(func=_cmd_recall_compare)

    booksum = sub.add_parser("booksum", help="book summarization: train, evaluate (ROUGE), compare")
    booksum = booksum.add_subparsers(dest="action", required=True)
    _add_run_commands(booksum, "booksum")

    p = booksum.add_parser("eval", help="ROUGE of one memzoo checkpoint, or of a transformers LM with an eviction cache")
    p.add_argument("--checkpoint", type=_checkpoint, default=None, help="a memzoo checkpoint folder")
    p.add_argument("--hf", default=None, help="a transformers causal LM (folder or hub id) instead, with --cache")
    p.add_argument("--cache", default="full", help="--hf: memzoo.hf.EvictingCache policy (full, window, sinks, h2o, l2, namm)")
    p.add_argument("--budget", type=_positive_int, default=1024, help="--hf: tokens kept by the cache")
    p.add_argument("--evict-every", type=_positive_int, default=512, help="--hf: eviction period (also the prefill chunk)")
    _add_booksum_options(p)
    p.set_defaults(func=_cmd_booksum_eval)

    p = booksum.add_parser("compare", help="ROUGE of several checkpoints on the same books (default: checkpoints/booksum-*)")
    p.add_argument("--checkpoints", nargs="+", type=_checkpoint, default=None)
    _add_booksum_options(p)
    p.set_defaults(func=_cmd_booksum_compare)

    p = sub.add_parser("bench", help="tokens/s, peak RSS, state bytes, FLOP fraction of every design; memzoo vs the public peers")
    p.add_argument("--config", default="recipes/configs/bench/default.yaml", type=_existing_file, help="bench YAML")
    p.add_argument("--quick", action="store_true", help="the config's tiny `quick` section (smoke test, < 2 minutes)")
    p.add_argument("--designs", nargs="+", default=None, help="only these designs (default: the config's)")
    p.add_argument("--sections", nargs="+", default=None, choices=["peak", "forward", "train", "stream", "bf16", "peers"])
    p.add_argument("--out", default=None, help="results folder (default runs/bench, or runs/bench-quick with --quick)")
    p.add_argument("--fresh", action="store_true", help="measure the asked designs/sections again (replacing their rows; the others stay)")
    p.add_argument("--peers-python", default=None, help="interpreter of the peers' venv (default: the config's, .venv-peers)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch threads per measurement (default: the config's)")
    p.add_argument("--lengths", nargs="+", default=None, help="stream only these lengths, e.g. 1M (default: the config's)")
    p.set_defaults(func=_cmd_bench)

    namm = sub.add_parser("namm", help="evolve a NAMM scorer (CMA-ES), ship it, compare it with other eviction policies")
    namm = namm.add_subparsers(dest="action", required=True)
    p = namm.add_parser("evolve", help="CMA-ES over the NAMM scorer of a trained backbone (resumes; torchrun splits the population)")
    p.add_argument("--config", required=True, type=_existing_file, help="e.g. recipes/configs/evolve/namm.yaml")
    p.add_argument("--out", default=None, help="run folder (default: the config's out)")
    p.add_argument("--generations", type=_positive_int, default=None, help="override evolution.generations (total, resumed ones included)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (state saved) after this wall time")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT/state exists")
    p.add_argument(
        "--allow-changed",
        action="store_true",
        help="resume OUT/state although the config changed since it was saved (each change is named and recorded)",
    )
    p.add_argument(
        "--no-export",
        action="store_true",
        help="leave the config's scorer_out / checkpoint_out alone (an exploratory run; `memzoo namm export` ships it later)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_namm_evolve)

    p = namm.add_parser("export", help="ship a run's best scorer so far (the config's scorer_out and checkpoint_out)")
    p.add_argument("--config", required=True, type=_existing_file)
    p.add_argument("--run", default=None, help="run folder (default: the config's out)")
    p.set_defaults(func=_cmd_namm_export)

    p = namm.add_parser("compare", help="answer score of the evolved NAMM vs other policies at equal cache size (held-out prompts)")
    p.add_argument("--config", required=True, type=_existing_file, help="the evolution config (budget, rhythm, prompt length)")
    p.add_argument("--checkpoint", type=_checkpoint, default="checkpoints/passkey-namm", help="namm checkpoint (backbone + scorer)")
    p.add_argument("--designs", nargs="+", default=["namm", "h2o", "l2", "window"])
    p.add_argument("--tasks", nargs="+", default=["passkey", "book"])
    p.add_argument("--n-prompts", type=_positive_int, default=16, help="held-out prompts per task")
    p.add_argument("--out", default="runs/namm-compare", help="results folder (the docs' own: docs/results/namm)")
    p.set_defaults(func=_cmd_namm_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``memzoo`` command. A user error (bad path, name or value) is printed as one line with
    what to do, exit status 2; ``--debug`` anywhere on the line shows the traceback instead."""
    argv = list(argv) if argv is not None else sys.argv[1:]
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"memzoo {' '.join(argv[:2])}: error: {e}\n(add --debug for the traceback)", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`memzoo list | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the interpreter's final flush cannot fail again
        return 141  # 128 + SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
