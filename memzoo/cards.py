"""Model cards for shipped checkpoints, written from the files a run leaves (never typed by hand).

A shipped checkpoint folder holds the model (``config.json``, ``model.safetensors``, tokenizer),
``training.json`` (what trained it: the recipe, the command, steps, wall time, final loss, or the
checkpoint it was derived from) and ``README.md``, the card this module writes from those and
from the evaluation results JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

from .io import write_text_atomic
from .plots import format_length

__all__ = ["write_card", "accuracy_table", "recall_table", "rouge_table", "describe_curriculum"]


def describe_curriculum(curriculum: list[dict]) -> str:
    """``"256 tokens x 32, then 384 tokens x 24 alternating with 768 tokens x 12"`` (see training.recipe)."""

    def shape(entry: dict) -> str:
        return f"{entry['n_tokens']} tokens x {entry['batch_size']}"

    return ", then ".join(
        " alternating with ".join(shape(e) for e in stage["mix"]) if "mix" in stage else shape(stage) for stage in curriculum
    )


# What differs between tasks in a card: (tag, what it was trained for, its training data, the results heading).
_TASKS = {
    "passkey": ("passkey", "passkey retrieval", "synthetic passkey prompts (Landmark-attention template)", "Passkey accuracy"),
    "booksum-synthetic": (
        "booksum", "book summarization (synthetic books)",
        "synthetic books (narrative filler with key events, `memzoo.tasks.make_synthetic_book`) "
        "followed by `Summary:` and the list of events",
        "Summarization (ROUGE F1 x 100)",
    ),
    "booksum": (
        "booksum", "book summarization (BookSum)",
        "BookSum texts (`memzoo.tasks.load_booksum`, the recipe's level and source) followed by `Summary:` and the reference summary",
        "Summarization (ROUGE F1 x 100)",
    ),
    "recall": (
        "recall", "long-gap multi-query associative recall (MQAR)",
        "synthetic recall rows (key-value pairs, a filler gap, every key queried; `memzoo.tasks.recall`)",
        "Recall accuracy",
    ),
}


def accuracy_table(results: dict) -> str:
    """Markdown table lengths x depths of a passkey results dict."""
    depths = sorted({c["depth"] for c in results["cells"]})
    lengths = sorted({c["length"] for c in results["cells"]})
    acc = {(c["length"], c["depth"]): c for c in results["cells"]}
    header = "| length | " + " | ".join(f"depth {d:g}" for d in depths) + " | prompt tokens/s | state bytes |"
    lines = [header, "|---" * (len(depths) + 3) + "|"]
    for n in lengths:
        cells = [acc.get((n, d)) for d in depths]
        shown = [f"{c['correct']}/{c['n']}" if c else "-" for c in cells]
        done = [c for c in cells if c]
        speed = round(sum(c["tokens_per_s"] for c in done) / len(done)) if done else "-"
        state = max(c["state_bytes"] for c in done) if done else "-"
        lines.append(f"| {format_length(n)} | " + " | ".join(shown) + f" | {speed} | {state} |")
    return "\n".join(lines)


def recall_table(results: dict, control: dict | None = None) -> str:
    """Markdown table of a recall results dict: per variant and k, query accuracy by gap (``memory / off``
    where the memory-off control's results are given)."""
    gaps = sorted({c["gap"] for c in results["cells"]})
    off = {(c["variant"], c["k"], c["gap"]): c["accuracy"] for c in (control or {}).get("cells", [])}
    lines = ["| variant | pairs | " + " | ".join(f"gap {format_length(g)}" for g in gaps) + " |", "|---" * (len(gaps) + 2) + "|"]
    for variant in sorted({c["variant"] for c in results["cells"]}, key=lambda v: v != "standard"):
        for k in sorted({c["k"] for c in results["cells"]}):
            acc = {c["gap"]: c["accuracy"] for c in results["cells"] if c["variant"] == variant and c["k"] == k}
            pair = {g: f" / {off[variant, k, g]:.2f}" if (variant, k, g) in off else "" for g in gaps}
            shown = [f"{acc[g]:.2f}{pair[g]}" if g in acc else "-" for g in gaps]
            lines.append(f"| {variant} | {k} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def _length_phrase(results: dict) -> str:
    first = results["cells"][0]
    if "prompt_tokens" not in first:
        return ""
    return f"a length counts the prompt and the {first['length'] - first['prompt_tokens']} generated tokens; "


def _books_phrase(results: dict) -> str:
    data = results.get("data", {})
    if data.get("source") == "synthetic":
        lengths = " and ".join(format_length(n) for n in data["lengths"])
        return f"{results['n_books']} held-out synthetic books of {lengths} tokens ({data['n_events']} events each, seeds {data['seeds']})"
    return f"{results['n_books']} books from {data.get('source', '?')}"


def rouge_table(results: dict) -> str:
    """Markdown table of a booksum results dict: ROUGE per book and over all books, and event recall where books have events."""
    events = results.get("event_recall") is not None  # synthetic books: the share of their events repeated word for word

    def cells(scores: dict, recall: float | None) -> str:
        shown = [f"{scores[k]:.2f}" for k in ("rouge1", "rouge2", "rougeL", "overall")] + ([f"{recall:.2f}"] if events else [])
        return " | ".join(shown) + " |"

    extra = (" event recall |", "---|") if events else ("", "")
    lines = [f"| book | tokens | R-1 | R-2 | R-L | overall |{extra[0]}", f"|---|---|---|---|---|---|{extra[1]}"]
    lines += [f"| {b['id']} | {b['n_tokens']} | {cells(b, b.get('event_recall'))}" for b in results["books"]]
    lines.append(f"| **all** | | {cells(results['rouge'], results.get('event_recall'))}")
    return "\n".join(lines)


def _budget_lines(training: dict) -> list[str]:
    """The budget the comparison counts (steps x tokens per step) and the CPU it ran on, where recorded."""
    lines = []
    if training.get("tokens"):
        per_step = training["tokens"] / max(training["steps"], 1)
        lines.append(f"- budget: {training['steps']:,} steps x {per_step:,.0f} tokens per step = {training['tokens'] / 1e6:.2f}M tokens"
                     + (" (this run's own; its warm starts below)" if training.get("warm_start") else ""))  # fmt: skip
    lines += _chain_lines(training)
    lines += _machine_lines(training)
    return lines


def _chain_lines(training: dict) -> list[str]:
    """Every stage the warm starts put behind this run, and the budget they add up to (warm starts count)."""
    from .training.budget import chain_totals, stage

    chain = training.get("warm_start", {}).get("chain")
    if not chain:
        return []
    chain = [*chain, stage(training, training.get("recipe_file", "this run"))]
    on_task, everything = chain_totals(chain, training.get("task")), chain_totals(chain)
    other = everything["tokens"] - on_task["tokens"]
    lines = [f"- with its warm starts: {on_task['steps']:,} steps = {on_task['tokens'] / 1e6:.2f}M tokens on this task"
             + (f", {other / 1e6:.2f}M on other tasks" if other else "")
             + ("" if everything["tokens_complete"] else ", and stages whose tokens were not recorded")
             + f"; {everything['train_seconds'] / 3600:.1f} h of CPU in all:"]  # fmt: skip
    for s in chain:
        size = f"{s['steps']:,} steps, {s['tokens'] / 1e6:.2f}M tokens" if s["tokens"] else "tokens not recorded"
        note = f", {s['note']}" if s.get("note") else ""
        lines.append(f"    - `{s['source']}` ({s['task'] or 'task not recorded'}{note}): {size}, {(s['train_seconds'] or 0) / 60:.0f} min")
    return lines


def _machine_lines(training: dict) -> list[str]:
    """The CPU flags of the machines that ran the steps (a run resumed elsewhere lists each), or what is not recorded."""
    machines = training.get("machines")
    if machines is None:  # a record from before runs kept their machines: the one it names, if any
        return [f"- CPU flags: {', '.join(training['cpu_flags'])}"] if training.get("cpu_flags") else []
    ranged = len(machines) > 1 or bool(machines and machines[0]["from_step"])  # one machine for every step: no ranges
    lines, step = [], 0
    for m in machines:
        if m["from_step"] > step:
            lines.append(f"- CPU flags, steps {step}-{m['from_step']}: not recorded (resumed from a run saved before runs kept them)")
        steps = f", steps {m['from_step']}-{m['to_step']}" if ranged else ""
        lines.append(f"- CPU flags{steps}: {', '.join(m['cpu_flags']) or 'none of avx2/avx512/amx'}")
        step = m["to_step"]
    return lines


def _warm_start_lines(training: dict) -> list[str]:
    warm = training.get("warm_start")
    if not warm:
        return []
    source = warm.get("source_train_seconds")
    total = f"; with the source's own {source / 60:.1f} min, {(source + training['train_seconds']) / 60:.1f} min in all" if source else ""
    what = warm.get("source_note", "the backbone it shares")
    if warm.get("chain"):  # the stages and minutes are listed under the budget
        what, total = warm.get("source_note", "the stage before"), ""
    return [
        f"- warm start: {warm['copied']} tensors from `{warm['source']}` ({what}{total}); "
        f"its own {len(warm['kept_init'])} tensors started fresh"
    ]


def write_card(checkpoint: str | Path, results_path: str | Path | None = None, task: str | None = None) -> Path:
    """(Re)write ``checkpoint/README.md`` from ``checkpoint/training.json`` and a results JSON.

    Args:
        checkpoint: a shipped checkpoint folder.
        results_path: results JSON of this checkpoint (from ``memzoo passkey eval`` or ``memzoo booksum eval``).
        task: ``"passkey"``, ``"recall"`` or ``"booksum-synthetic"``; default: ``training.json``'s ``task``, else
            booksum if the results hold ROUGE, else passkey.

    Returns:
        the card's path.
    """
    checkpoint = Path(checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    training_file = checkpoint / "training.json"
    training = json.loads(training_file.read_text()) if training_file.is_file() else {}
    name = config["memory"]
    results = json.loads(Path(results_path).read_text()) if results_path and Path(results_path).is_file() else None
    task = task or training.get("task") or ("booksum-synthetic" if results and "rouge" in results else "passkey")
    tag, purpose, data, heading = _TASKS[task]
    lines = [
        "---",
        "library_name: memzoo",
        f"tags: [memzoo, long-context, {tag}, {name}]",
        "---",
        f"# {checkpoint.name}",
        "",
        f"A tiny byte-level memzoo model whose every layer uses the `{name}` memory design, trained for {purpose} "
        "on a 2-core CPU. It exists to compare memory designs side by side, not to be useful on its own.",
        "",
        "```python",
        "import memzoo",
        f'model = memzoo.load("checkpoints/{checkpoint.name}")',
        "```",
        "",
        "## Model",
        "",
        f"- design: `{name}`, options `{json.dumps(config.get('memory_config', {}))}`",
        f"- backbone: d_model {config['d_model']}, {config['n_layers']} layers, {config['n_heads']} heads, "
        f"vocab {config['vocab_size']} (bytes)",
        f"- weights stored as {training.get('stored_dtype', 'float32')}",
        "",
        "## Training",
        "",
    ]
    if training.get("evolved"):  # a NAMM whose scorer was evolved (memzoo namm evolve) on a trained backbone
        ev = training["evolved"]
        lines += [
            f"The weights of `{training['derived_from']}` with the `{name}` cache policy; its scorer was evolved by CMA-ES "
            f"(population {ev['popsize']}, sigma0 {ev['sigma0']}) for {ev['generations']} generations "
            f"({ev['wall_s'] / 60:.1f} min, tasks {', '.join(ev['tasks'])}, "
            + (f"best fitness {ev['best_fitness']:.4f} = score / full-cache score)" if ev.get("fitness", "ratio") == "ratio"
               else f"best candidate's answer score {ev['best_fitness']:.4f}"
               + (f", best held-out score of the mean {ev['held_out']:.4f}" if ev.get("held_out") is not None else "") + ")")
            + ("" if ev.get("complete", True) else ", **best so far of an unfinished run**") + f". Scorer alone: `{ev['scorer']}`.",
            "",
            f"Command: `{training['command']}`",
        ]
    elif training.get("derived_from"):
        lines += [
            f"No training of its own: the weights of `{training['derived_from']}` with the `{name}` cache policy, so that "
            "KV designs differ only in what they keep.",
            "",
            f"Command: `{training['command']}`",
        ]
        if training.get("scorer"):
            lines += ["", f"The NAMM scorer is `{training['scorer']}`: how it was made is on its card."]
    elif training:
        planned = training.get("train", {}).get("steps", 0)  # max_minutes may end a run early
        stopped = f"; the time limit stopped it before the planned {planned}" if planned > training["steps"] else ""
        lines += [
            f"Command: `{training['command']}`",
            "",
            f"- recipe: `{training.get('recipe_file', '?')}` ({training['steps']} steps, "
            f"{training['train_seconds'] / 60:.1f} min of training on this project's 2-core CPU{stopped})",
            *_budget_lines(training),
            *_warm_start_lines(training),
            f"- final training loss (weighted cross-entropy): {training['final_loss']:.4f}",
            f"- parameters: {training['parameters']:,}",
            f"- data: {data}, curriculum "
            + describe_curriculum(training.get("curriculum", [])),
        ]
        if training.get("notes"):
            lines += ["", training["notes"]]
    else:
        lines.append("Not recorded.")
    lines += ["", f"## {heading}", ""]
    if results and task == "booksum-synthetic":
        decoding = results.get("decoding", {})
        lines += [
            _books_phrase(results) + ", "
            + ("sampled (temperature {temperature}, top-p {top_p})".format(**decoding) if decoding.get("do_sample") else "greedy decoding")
            + f"; measured with `{results.get('command', 'memzoo booksum eval')}` (results: `{results_path}`"
            + ("" if results.get("complete", True) else ", **incomplete: the run was cut short**")
            + ").",
            "",
            rouge_table(results),
        ]
    elif results and task == "recall":
        control_path = Path(results_path).with_name(Path(results_path).stem + "-memory-off.json")
        control = json.loads(control_path.read_text()) if control_path.is_file() else None
        if control is not None and control.get("weights_sha256") != results.get("weights_sha256"):
            control = None  # a control of other weights is no control
        lines += [
            f"Share of queries whose whole value is the argmax (teacher forced; chance {results.get('chance', 0):g}), at least "
            f"{results['min_queries']} queries per cell"
            + (f"; `memory / off`: with its memory off (`{control_path}`: {control['memory_off_means']})" if control else "")
            + "; measured with " + "; ".join(f"`{c}`" for c in results.get("commands", []))
            + f" (results: `{results_path}`" + ("" if results.get("complete", True) else ", **incomplete**") + ").",
            "",
            recall_table(results, control),
            "",
            "A gap inside the design's local window (its segment, window or cache) is local context, not memory.",
        ]
    elif results:
        lines += [
            f"Correct answers out of {results['n_keys']} keys per cell, greedy decoding; {_length_phrase(results)}measured with "
            + "; ".join(f"`{c}`" for c in results.get("commands", [f"memzoo passkey eval --checkpoint checkpoints/{checkpoint.name}"]))
            + f" (results: `{results_path}`"
            + ("" if results.get("complete", True) else ", **incomplete: the run was cut short**")
            + ").",
            "",
            accuracy_table(results),
            "",
            "prompt tokens/s counts every prompt's tokens, though the filler before the needle is streamed once per cell and "
            "shared by its keys (exact, by split invariance); state bytes are per sequence. Depth 1 puts the needle right "
            "before the question, within any local window: a hit there is local context, not memory.",
        ]
        correct = sum(c["correct"] for c in results["cells"])
        if correct == 0:
            lines += ["", "**This checkpoint did not learn to retrieve the key: no cell has a correct answer.**"]
        elif {c["depth"] for c in results["cells"] if c["correct"]} == {1.0}:
            lines += [
                "",
                "**Correct only at depth 1** (the needle right before the question, within local context): "
                "it has not learned to retrieve a needle that only its memory could carry.",
            ]
    else:
        lines.append("Not measured yet.")
    return write_text_atomic(checkpoint / "README.md", "\n".join(lines) + "\n")
