"""Where a design's streaming time goes: torch.profiler's operator table for ``model.stream``.

Streams random tokens through a fresh model (default d 128 x 2 layers, 4 heads, as ``memzoo bench``), batch 1,
no gradients, in calls of ``--segment-len``; the first ``--warmup`` tokens are not profiled. Prints the
operators by self CPU time, and writes them as JSON with the CPU flags::

    OMP_NUM_THREADS=1 python recipes/profile_stream.py window --tokens 16384   # -> runs/profile/window.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.profiler import profile

from memzoo.bench import _build, _ids, machine_info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("design")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--warmup", type=int, default=4096)
    ap.add_argument("--segment-len", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=15, help="operators to print")
    ap.add_argument("--out", default="runs/profile")
    args = ap.parse_args()
    if not 0 <= args.warmup < args.tokens:
        raise SystemExit(f"--warmup must lie in [0, --tokens={args.tokens}), got {args.warmup}")
    torch.set_num_threads(1)
    model = _build(args.design, {"d_model": 128, "n_layers": 2, "n_heads": 4}).eval()
    ids, state, n = _ids(args.tokens, 1), model.init_state(1), args.segment_len

    def stream(start: int, end: int) -> None:
        nonlocal state
        for s in range(start, end, n):
            state = model.stream(ids[:, s : min(s + n, end)], segment_len=n, state=state).state

    with torch.no_grad():
        stream(0, args.warmup)
        with profile() as prof:
            stream(args.warmup, args.tokens)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    rows = [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 2), "share": round(e.self_cpu_time_total / total, 4),
             "calls": e.count} for e in events]  # fmt: skip
    print(f"{args.design}: {args.tokens - args.warmup} tokens profiled, {total / 1e6:.3f} s of self CPU time")
    for r in rows[: args.rows]:
        print(f"  {r['share']:6.1%} {r['self_ms']:9.1f} ms {r['calls']:6d} calls  {r['op']}")
    out = Path(args.out) / f"{args.design}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"design": args.design, "tokens": args.tokens - args.warmup, "segment_len": n,
                               "machine": machine_info(), "self_cpu_s": round(total / 1e6, 3), "ops": rows}, indent=1))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
