"""Time one memory implementation, memzoo's or a public one, at a given size; print one JSON line.

``memzoo bench`` runs this script in a fresh process per measurement, with the interpreter of the
environment that holds the implementation: ``.venv`` for memzoo, ``.venv-peers`` (made by
``recipes/setup_peers.sh``) for the public ones, which are not memzoo dependencies. The same code
times both sides, at equal sizes and chunking:

* ``titans-pytorch`` ``NeuralMemory(dim, heads, dim_head=dim/heads, chunk_size, depth 2,
  expansion 4)`` vs ``memzoo-titans``: memzoo's ``memories.titans.NeuralMemory`` (same d, h, chunk,
  depth, expansion), the memory alone, no backbone;
* ``infini-transformer-pytorch`` ``InfiniTransformer(delta rule, dim, depth, heads, dim_head,
  ff_mult 4)`` streamed segment by segment vs ``memzoo-infini``: ``memzoo.build("infini")`` with
  the same d, layers, heads, segment length and feed-forward width.

Measured: streaming forward (no gradients, ``segment`` tokens per call, state carried) tokens/s;
forward + backward tokens/s over ``train_tokens`` in one call; peak RSS of the process (fresh,
so its ``VmHWM`` is this measurement's) and RSS after building the module.

It imports nothing from memzoo unless it times memzoo (the peers' environment has no memzoo), so
its two small timing helpers mirror ``memzoo.bench``::

    .venv-peers/bin/python recipes/peer_run.py --impl titans-pytorch --dim 256 --heads 4 --chunk 16
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def rss_mib(peak: bool = True) -> float:
    """Peak (VmHWM: this process's own, unlike ru_maxrss which a child inherits from its parent) or current RSS, MiB."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return int(fields["VmHWM" if peak else "VmRSS"].split()[0]) / 1024


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def build(a):
    """(module, stream_fn(x_or_ids, state) -> (out, state), initial state, input maker, version)."""
    if a.impl == "titans-pytorch":
        import importlib.metadata

        from titans_pytorch import NeuralMemory

        mem = NeuralMemory(dim=a.dim, heads=a.heads, dim_head=a.dim // a.heads, chunk_size=a.chunk,
                           default_model_kwargs=dict(depth=2, expansion_factor=4.0))  # fmt: skip
        return mem, lambda x, s: mem(x, state=s), None, "float", importlib.metadata.version("titans-pytorch")
    if a.impl == "memzoo-titans":
        import memzoo
        from memzoo.memories.titans import NeuralMemory, TitansConfig

        mem = NeuralMemory(a.dim, a.heads, TitansConfig(chunk_size=a.chunk, memory_depth=2, memory_expansion=4))
        return mem, lambda x, s: mem(x, s), mem.init_state(1), "float", memzoo.__version__ if hasattr(memzoo, "__version__") else "repo"
    if a.impl == "infini-transformer-pytorch":
        import importlib.metadata

        from infini_transformer_pytorch import InfiniTransformer

        model = InfiniTransformer(num_tokens=259, dim=a.dim, depth=a.depth, dim_head=a.dim // a.heads, heads=a.heads,
                                  ff_mult=4, use_mem_delta_rule=True)  # fmt: skip

        def step(ids, mems):
            out = model(ids, past_memories=mems, return_new_memories=True)
            return out[0], out[2]

        return model, step, None, "ids", importlib.metadata.version("infini-transformer-pytorch")
    if a.impl == "memzoo-infini":
        import memzoo

        # the peer's FeedForward width: int(ff_mult * dim * 2 / 3) with ff_mult 4
        model = memzoo.build("infini", d_model=a.dim, n_layers=a.depth, n_heads=a.heads, d_ff=int(4 * a.dim * 2 / 3), segment_len=a.segment)

        def step(ids, state):
            out = model(ids, state=state)
            return out.logits, out.state

        return model, step, model.init_state(1), "ids", "repo"
    raise SystemExit(f"unknown --impl {a.impl!r}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impl", required=True, choices=["titans-pytorch", "memzoo-titans", "infini-transformer-pytorch", "memzoo-infini"])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--depth", type=int, default=2, help="layers (infini models)")
    p.add_argument("--chunk", type=int, default=16, help="titans memory update chunk")
    p.add_argument("--segment", type=int, default=512, help="tokens per streaming call (infini: its segment length)")
    p.add_argument("--tokens", type=int, default=2048, help="streamed tokens")
    p.add_argument("--train-tokens", type=int, default=1024, help="forward + backward tokens, one call (0: skip)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    module, step, state0, kind, version = build(a)
    g = torch.Generator().manual_seed(0)

    def inputs(n):
        return torch.randint(3, 259, (1, n), generator=g) if kind == "ids" else torch.randn(1, n, a.dim, generator=g)

    rss_build = rss_mib(peak=False)
    x = inputs(a.tokens)

    def stream():
        state = state0
        with torch.no_grad():
            for start in range(0, a.tokens, a.segment):
                _, state = step(x[:, start : start + a.segment], state)

    stream_s = best_time(stream, a.repeats)
    row = {"impl": a.impl, "version": version, "dim": a.dim, "heads": a.heads, "depth": a.depth, "chunk": a.chunk, "segment": a.segment,
           "tokens": a.tokens, "parameters": sum(q.numel() for q in module.parameters()), "rss_after_build_mib": round(rss_build, 1),
           "stream_seconds": round(stream_s, 3), "stream_tokens_per_s": round(a.tokens / stream_s, 1),
           "stream_peak_rss_mib": round(rss_mib(), 1)}  # fmt: skip
    if a.train_tokens:
        xt = inputs(a.train_tokens)

        def train():
            out, _ = step(xt, state0)
            out.float().square().mean().backward()
            module.zero_grad(set_to_none=True)

        train_s = best_time(train, a.repeats)
        row |= {
            "train_tokens": a.train_tokens,
            "train_seconds": round(train_s, 3),
            "train_tokens_per_s": round(a.train_tokens / train_s, 1),
        }
    row |= {"peak_rss_mib": round(rss_mib(), 1), "threads": a.threads, "loadavg_1min": round(os.getloadavg()[0], 2)}
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
