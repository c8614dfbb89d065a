"""infini-deltanet's cost against infini's, measured side by side in one process.

Streaming (no gradients, calls of 2,048 tokens) and training (forward + backward of 2 x 4,608
tokens, the recipe's last shape), at the shipped size (d 128 x 3 layers x 4 heads), one thread,
the two designs alternating so that a busy machine slows both alike; the best of the repeats:

    OMP_NUM_THREADS=1 python recipes/bench_infini.py --out docs/results/bench/bench_infini.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import memzoo
import memzoo.ops.infini as infini_ops
from memzoo.bench import cpu_flags
from memzoo.io import write_text_atomic

DESIGNS = ("infini", "infini-deltanet")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stream-tokens", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--deltanet-chunk", type=int, default=None,
                        help="tokens per DeltaNet sub-chunk (default: memzoo's DELTANET_CHUNK); e.g. 256 = one solve per segment")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/bench_infini.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.deltanet_chunk:
        infini_ops.DELTANET_CHUNK = args.deltanet_chunk
    models = {n: memzoo.build(n, d_model=128, n_layers=3, n_heads=4) for n in DESIGNS}
    ids = torch.randint(3, 259, (1, args.stream_tokens))
    batch = torch.randint(3, 259, (2, 4608))
    stream, train = {n: [] for n in DESIGNS}, {n: [] for n in DESIGNS}
    for _ in range(args.repeats):
        for name, model in models.items():
            model.eval()
            with torch.no_grad():
                start = time.perf_counter()
                model.stream(ids, segment_len=2048)
                stream[name].append(time.perf_counter() - start)
            model.train()
            start = time.perf_counter()
            model(batch, labels=batch).loss.backward()
            train[name].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    rows = {
        n: {"stream_tokens_per_s": round(args.stream_tokens / min(stream[n])), "train_tokens_per_s": round(batch.numel() / min(train[n]))}
        for n in DESIGNS
    }
    result = {
        "designs": rows,
        "ratio_stream": round(min(stream["infini-deltanet"]) / min(stream["infini"]), 2),
        "ratio_train": round(min(train["infini-deltanet"]) / min(train["infini"]), 2),
        "config": {"d_model": 128, "n_layers": 3, "n_heads": 4, "stream_tokens": args.stream_tokens, "segment_len": 2048,
                   "train_batch": list(batch.shape), "repeats": args.repeats, "threads": 1,
                   "deltanet_chunk": infini_ops.DELTANET_CHUNK},  # fmt: skip
        "machine": {"cpu_flags": cpu_flags(), "torch": torch.__version__},
        "command": "python recipes/bench_infini.py" + (f" --deltanet-chunk {args.deltanet_chunk}" if args.deltanet_chunk else "")
        + f" --out {args.out}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(result, indent=1))
    for n, r in rows.items():
        print(f"{n:16s} stream {r['stream_tokens_per_s']:>7,} tok/s   train {r['train_tokens_per_s']:>6,} tok/s")
    print(f"time ratio infini-deltanet / infini: stream {result['ratio_stream']}x, train {result['ratio_train']}x; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
