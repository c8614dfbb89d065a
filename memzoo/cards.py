"""Model cards for shipped checkpoints, written from the files a run leaves (never typed by hand).

A shipped checkpoint folder holds the model (``config.json``, ``model.safetensors``, tokenizer),
``training.json`` (what trained it: the recipe, the command, steps, wall time, final loss, or the
checkpoint it was derived from) and ``README.md``, the card this module writes from those and
from the evaluation results JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

from .plots import format_length

__all__ = ["write_card", "accuracy_table"]


def accuracy_table(results: dict) -> str:
    """Markdown table lengths x depths of a passkey results dict."""
    depths = sorted({c["depth"] for c in results["cells"]})
    lengths = sorted({c["length"] for c in results["cells"]})
    acc = {(c["length"], c["depth"]): c for c in results["cells"]}
    lines = ["| length | " + " | ".join(f"depth {d:g}" for d in depths) + " | tokens/s | state bytes |", "|---" * (len(depths) + 3) + "|"]
    for n in lengths:
        cells = [acc.get((n, d)) for d in depths]
        shown = [f"{c['correct']}/{c['n']}" if c else "-" for c in cells]
        done = [c for c in cells if c]
        speed = round(sum(c["tokens_per_s"] for c in done) / len(done)) if done else "-"
        state = max(c["state_bytes"] for c in done) if done else "-"
        lines.append(f"| {format_length(n)} | " + " | ".join(shown) + f" | {speed} | {state} |")
    return "\n".join(lines)


def write_card(checkpoint: str | Path, results_path: str | Path | None = None) -> Path:
    """(Re)write ``checkpoint/README.md`` from ``checkpoint/training.json`` and a results JSON.

    Args:
        checkpoint: a shipped checkpoint folder.
        results_path: passkey results JSON of this checkpoint (from ``memzoo passkey eval``).

    Returns:
        the card's path.
    """
    checkpoint = Path(checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    training_file = checkpoint / "training.json"
    training = json.loads(training_file.read_text()) if training_file.is_file() else {}
    name = config["memory"]
    lines = [
        "---",
        "library_name: memzoo",
        f"tags: [memzoo, long-context, passkey, {name}]",
        "---",
        f"# {checkpoint.name}",
        "",
        f"A tiny byte-level memzoo model whose every layer uses the `{name}` memory design, trained for passkey "
        "retrieval on a 2-core CPU. It exists to compare memory designs side by side, not to be useful on its own.",
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
    if training.get("derived_from"):
        lines += [
            f"No training of its own: the weights of `{training['derived_from']}` with the `{name}` cache policy, so that "
            "KV designs differ only in what they keep.",
            "",
            f"Command: `{training['command']}`",
        ]
    elif training:
        lines += [
            f"Command: `{training['command']}`",
            "",
            f"- recipe: `{training.get('recipe_file', '?')}` ({training['steps']} steps, "
            f"{training['train_seconds'] / 60:.1f} min of training on this project's 2-core CPU)",
            f"- final training loss (weighted cross-entropy): {training['final_loss']:.4f}",
            f"- parameters: {training['parameters']:,}",
            "- data: synthetic passkey prompts (Landmark-attention template), curriculum "
            + ", ".join(f"{s['n_tokens']} tokens x {s['batch_size']}" for s in training.get("curriculum", [])),
        ]
        if training.get("notes"):
            lines += ["", training["notes"]]
    else:
        lines.append("Not recorded.")
    lines += ["", "## Passkey accuracy", ""]
    if results_path and Path(results_path).is_file():
        results = json.loads(Path(results_path).read_text())
        lines += [
            f"Correct answers out of {results['n_keys']} keys per cell, greedy decoding; measured with "
            f"`memzoo passkey eval --checkpoint checkpoints/{checkpoint.name}` (results: `{results_path}`"
            + ("" if results.get("complete", True) else ", **incomplete: the run was cut short**")
            + ").",
            "",
            accuracy_table(results),
        ]
    else:
        lines.append("Not measured yet.")
    path = checkpoint / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path
