"""How a compressive memory changes over a long passkey stream: the norm of each layer's memory M
and how far it moved, at points of a 1M-token prompt (needle at depth 0), for a shipped checkpoint.

A memory whose filler writes reach a fixed point stops moving; one that keeps drifting erodes a
fact written early and, through its read, the local answer too:

    OMP_NUM_THREADS=1 python recipes/infini_memory_drift.py --out docs/results/infini/memory-drift.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import memzoo
from memzoo.bench import cpu_flags
from memzoo.io import write_text_atomic
from memzoo.tasks.passkey import make_sample
from memzoo.units import format_length, parse_length


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="checkpoints/passkey-infini-deltanet")
    parser.add_argument("--length", default="1M", help="prompt tokens")
    parser.add_argument("--depth", type=float, default=0.0)
    parser.add_argument("--out", type=Path, default=Path("runs/infini/memory-drift.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = memzoo.load(args.checkpoint).eval()
    n = parse_length(args.length)
    ids = make_sample(n, args.depth, 12345, memzoo.tokenizer()).input_ids[None]
    marks = sorted({m for m in (4096, 16384, 65536, 262144, 1048576, n) if m <= n})
    state, start, points, first = model.init_state(1), 0, [], None
    with torch.no_grad():
        for mark in marks:
            state = model.stream(ids[:, start:mark], segment_len=2048, state=state).state
            start = mark
            Ms = [layer.M[0].clone() for layer in state.layers]  # [h, k, v] per layer
            first = first or Ms
            points.append({
                "tokens": mark,
                "norm": [round(float(M.norm()), 4) for M in Ms],
                "moved_since_first": [round(float((M - M0).norm() / M0.norm().clamp_min(1e-12)), 4) for M, M0 in zip(Ms, first)],
            })  # fmt: skip
            print(f"{format_length(mark):>5}: |M| per layer {points[-1]['norm']}, moved since {format_length(marks[0])} "
                  f"{points[-1]['moved_since_first']} (relative)")  # fmt: skip
    result = {"checkpoint": args.checkpoint, "length": n, "depth": args.depth, "points": points,
              "machine": {"cpu_flags": cpu_flags()}, "command": f"python recipes/infini_memory_drift.py --out {args.out}"}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
