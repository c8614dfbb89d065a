"""Titans benchmark: the chunked memory against the token-by-token reference, and streaming 100K tokens.

1. ``ops``: :func:`memzoo.ops.titans.titans_chunked` vs :func:`~memzoo.ops.titans.titans_naive`
   on the same maths (gradients at the start of each chunk of 16), one memory per head, 2048
   tokens: wall time of each (forward, no grad), their speed ratio, the largest difference of
   their reads, and the chunked form's forward + backward time.
2. ``stream`` (run first, in a fresh process): ``titans-mac`` in a 4-layer d=256 model,
   ``model.stream(...)`` over 10K then 100K random tokens (batch 1, 512 tokens per call):
   tokens/s, peak RSS of the process after each (flat = bounded memory), ``state.nbytes()``.

Results go to JSON (numbers in the docs come from that file)::

    nice -n 10 python recipes/bench_titans.py            # -> docs/results/bench/bench_titans.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import memzoo
from memzoo.bench import machine_info, peak_rss_mib, timed
from memzoo.ops.titans import mlp_shapes, titans_chunked, titans_naive


def memory_inputs(n: int, heads: int, dim: int, depth: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = mlp_shapes(depth, dim)
    weights = tuple(torch.randn(1, heads, o, i, generator=g) / math.sqrt(i) for o, i in shapes)
    momentum = tuple(torch.zeros(1, heads, o, i) for o, i in shapes)
    q, k = (F.normalize(torch.randn(1, heads, n, dim, generator=g), dim=-1) for _ in range(2))
    v = torch.randn(1, heads, n, dim, generator=g)
    eta = 0.8 + 0.2 * torch.rand(1, heads, n, generator=g)
    theta = 0.02 * torch.rand(1, heads, n, generator=g)
    alpha = 0.01 * torch.rand(1, heads, n, generator=g)
    return weights, momentum, q, k, v, eta, theta, alpha


def bench_ops(n: int, heads: int, dim: int, depth: int, chunk: int) -> dict:
    args = memory_inputs(n, heads, dim, depth)
    with torch.no_grad():
        t_naive, naive = timed(lambda: titans_naive(*args, chunk_size=chunk))
        t_fast, fast = timed(lambda: titans_chunked(*args, chunk_size=chunk), repeats=3)
    leaves = [t.clone().requires_grad_() for t in args[2:]]

    def fwd_bwd():
        reads, _, _ = titans_chunked(*args[:2], *leaves, chunk_size=chunk)
        reads.square().sum().backward()

    t_train, _ = timed(fwd_bwd, repeats=3)
    return {
        "tokens": n,
        "heads": heads,
        "head_dim": dim,
        "memory_depth": depth,
        "chunk_size": chunk,
        "naive_forward_s": round(t_naive, 4),
        "chunked_forward_s": round(t_fast, 4),
        "speed_ratio": round(t_naive / t_fast, 1),
        "chunked_forward_backward_s": round(t_train, 4),
        "max_abs_diff_reads": float((naive[0] - fast[0]).abs().max()),
        "max_abs_diff_weights": max(float((a - b).abs().max()) for a, b in zip(naive[1], fast[1])),
    }


def bench_stream(design: str, lengths: list[int], d_model: int, n_layers: int, segment_len: int) -> dict:
    torch.manual_seed(0)
    model = memzoo.build(design, d_model=d_model, n_layers=n_layers).eval()
    ids = torch.randint(3, 259, (1, max(lengths)), generator=torch.Generator().manual_seed(0))
    runs = []
    for n in lengths:
        t0 = time.perf_counter()
        out = model.stream(ids[:, :n], segment_len=segment_len)
        dt = time.perf_counter() - t0
        finite = bool(torch.isfinite(out.logits).all()) and all(
            bool(torch.isfinite(w).all()) for layer in out.state.layers for w in layer.memory.weights
        )
        runs.append(
            {
                "tokens": n,
                "seconds": round(dt, 2),
                "tokens_per_s": round(n / dt),
                "peak_rss_mib": round(peak_rss_mib()),
                "state_nbytes": out.state.nbytes(),
                "finite": finite,
                "loadavg_1min_after": os.getloadavg()[0],
            }
        )
        print(f"  stream {n} tokens: {n / dt:.0f} tok/s, peak RSS {peak_rss_mib():.0f} MiB, state {out.state.nbytes()} B, finite {finite}")
    params = sum(p.numel() for p in model.parameters())
    return {"design": design, "d_model": d_model, "n_layers": n_layers, "parameters": params, "call_segment_len": segment_len, "runs": runs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/results/bench/bench_titans.json")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    p.add_argument("--tokens", type=int, default=2048, help="ops benchmark length")
    p.add_argument("--stream-lengths", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--skip-stream", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    info = machine_info()  # the machine is shared: a 1-minute load above the core count means pessimistic timings
    result = {
        "torch": info["torch"],
        "threads": args.threads,
        "machine": info["cpu"],
        "rss_at_start_mib": round(peak_rss_mib()),
        "cores": info["cores"],
        "loadavg_1min_at_start": info["loadavg_1min"],
    }
    # streaming first, so that its peak RSS is not the ops benchmark's (ru_maxrss never goes down)
    if not args.skip_stream:
        print("stream: titans-mac, d=256, 4 layers")
        result["stream"] = bench_stream("titans-mac", args.stream_lengths, d_model=256, n_layers=4, segment_len=512)
    print("ops: chunked vs naive")
    result["ops"] = bench_ops(args.tokens, heads=4, dim=64, depth=2, chunk=16)
    result["ops"]["peak_rss_mib_after"] = round(peak_rss_mib())
    result["ops"]["loadavg_1min_after"] = os.getloadavg()[0]
    print(" ", json.dumps(result["ops"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
