"""The ``memzoo`` console command.

    memzoo list                       # registry names and their config defaults
    memzoo demo                       # stream 100K tokens through two designs: state bytes, tokens/s

Each sub-command is a small function below; long jobs live in ``recipes/`` and in the
``memzoo.tasks`` / ``memzoo.training`` packages, which the sub-commands call.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

__all__ = ["main"]


def _cmd_list(args: argparse.Namespace) -> int:
    import memzoo
    from memzoo.registry import memory_config

    for name in memzoo.available():
        cfg = memory_config(name)
        print(f"{name:14s} {type(cfg).__name__:18s} {json.dumps(dataclasses.asdict(cfg))}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """Stream random tokens through each design; print state bytes and tokens/s as JSON lines."""
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memzoo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list the memory designs and their defaults")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("demo", help="stream a long random input through designs; print state bytes and tokens/s")
    p.add_argument("--designs", nargs="+", default=["window", "sinks"], help="registry names (default: window sinks)")
    p.add_argument("--tokens", type=int, default=100_000)
    p.add_argument("--segment-len", type=int, default=2048)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
