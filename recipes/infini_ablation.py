"""The Infini ablation: which change lets a compressive memory carry a passkey to the question.

Each row trains the `infini` family for passkey from the same warm start (checkpoints/passkey-full)
with the same short budget (``--steps`` x 9,216 tokens per step) and curriculum (3 segments of
256 tokens, then 6: the stage in which the full `infini-deltanet` run learned to read its memory,
by step 400), changing the memory's options one group at a time, then probes it (teacher-forced
answer cross-entropy, 1K/4K/16K x 5 depths) with its memory on and off:

    OMP_NUM_THREADS=1 python recipes/infini_ablation.py                        # -> runs/infini-ablation
    OMP_NUM_THREADS=1 python recipes/infini_ablation.py --out docs/results/infini/ablation.json

Runs resume (a killed row continues from its last save; a probed row is skipped), so the
ablation can be spread over several sessions. The docs' table is generated from the JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
from pathlib import Path

import torch

import memzoo
from memzoo.bench import cpu_flags
from memzoo.io import write_text_atomic
from memzoo.tasks.passkey_eval import probe_passkey
from memzoo.training.recipe import load_recipe, train_recipe

BASE = Path(__file__).parent / "configs" / "passkey" / "infini-deltanet.yaml"
#: 9,216 tokens per step, as the base recipe; 250 steps up to 18 segments taught no row to read its memory
CURRICULUM = [{"until": 0.4, "n_tokens": 768, "batch_size": 12}, {"until": 1.0, "n_tokens": 1536, "batch_size": 6}]

#: row name -> (what it changes, the model section's memory options)
ROWS = {
    "paper": ("infini as the paper writes it (ELU + 1, delta rule, normaliser, gate)", dict(memory="infini")),
    "zero-init output": ("the paper's memory, read through a zero-initialised output instead of the gate",
                         dict(memory="infini", mix="add")),
    "unit keys, linear": ("SiLU-L2 keys and queries, no normaliser, linear rule",
                          dict(memory="infini", mix="add", feature_map="silu-l2", normalize=False, update_rule="linear")),
    "unit keys, deltanet": ("SiLU-L2 keys, no normaliser, DeltaNet's token-by-token delta rule",
                            dict(memory="infini", mix="add", feature_map="silu-l2", normalize=False, update_rule="deltanet")),
    "+ write strength": ("as above, plus a per-token write strength b_t",
                         dict(memory="infini", mix="add", feature_map="silu-l2", normalize=False, update_rule="deltanet",
                              write_strength=True)),
    "infini-deltanet": ("as above, plus a causal conv on q/k/v (the registry name)", dict(memory="infini-deltanet")),
}  # fmt: skip


def run_row(name: str, options: dict, steps: int, root: Path, lengths: list[int], rows: int) -> dict:
    recipe = load_recipe(BASE)
    recipe["name"] = f"infini-ablation-{name}"
    model = {k: v for k, v in recipe["model"].items() if k != "memory"}
    recipe["model"] = {**model, **options}
    recipe["eval"] = {k: v for k, v in recipe["eval"].items() if not k.startswith("probe")}
    recipe["task"] = {**recipe["task"], "curriculum": CURRICULUM}
    recipe["train"] = {**recipe["train"], "steps": steps, "save_every": 25, "max_minutes": 0}
    out = root / name.replace(" ", "-").replace("+", "plus")
    summary = train_recipe(recipe, out, progress=True)
    model = memzoo.load(out / "model")
    depths = recipe["eval"]["depths"]
    with torch.no_grad():
        on = probe_passkey(model, lengths=lengths, depths=depths, n_rows=rows, progress=True)
        with memzoo.memory_off(model):
            off = probe_passkey(model, lengths=lengths, depths=depths, n_rows=rows, progress=True)
    return {
        "row": name,
        "changes": ROWS[name][0],
        "model": recipe["model"],
        "steps": summary["steps"],
        "tokens_per_step": 9216,
        "curriculum": CURRICULUM,
        "train_seconds": summary["train_seconds"],
        "warm_start": "checkpoints/passkey-full",
        "probe": on["cells"],
        "probe_memory_off": off["cells"],
        "run": str(out),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400, help="optimiser steps per row (9,216 tokens each)")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), help="which rows (default: all)")
    parser.add_argument("--runs", type=Path, default=Path("runs/infini-ablation-400"), help="run folders")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: <runs>/ablation.json)")
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096, 16384])
    parser.add_argument("--probe-rows", type=int, default=4, help="prompts per probe cell")
    args = parser.parse_args(argv)
    out = args.out or args.runs / "ablation.json"
    results = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    done = {r["row"]: r for r in results["rows"] if r["steps"] == args.steps}
    for name in args.rows:
        if name in done:
            print(f"{name}: already probed in {out}, skipped")
            continue
        row = run_row(name, ROWS[name][1], args.steps, args.runs, args.lengths, args.probe_rows)
        results["rows"] = [r for r in results["rows"] if r["row"] != name] + [row]
        results["rows"].sort(key=lambda r: list(ROWS).index(r["row"]))
        machine = {"cpu_flags": cpu_flags(), "torch": torch.__version__, "python": platform.python_version()}
        results.update(command=shlex.join(["python", "recipes/infini_ablation.py", *(sys.argv[1:] if argv is None else argv)]),
                       machine=machine | {"threads": torch.get_num_threads()})  # fmt: skip
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, json.dumps(results, indent=1))
        print(f"{name}: written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
