"""Which facts of a synthetic book's summary a model copies: the teacher-forced cross-entropy of each
fact's first token by role (person, deed, adjective, object, place), the template's, and event recall.

Chance is about ln 12 = 2.48 nats for a person or a place and ln 8 = 2.08 for the others; a copied
fact is near 0. The person follows only the chapter's number ("In chapter 2, ..."), the place the
shared "at the": those two need more than the word before them. Held-out books (seeds 0..N-1):

    OMP_NUM_THREADS=1 python recipes/booksum_probe.py --checkpoint runs/booksum-conv-mix/model \
        --lengths 384 1K --out runs/booksum-probe/conv-mix.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

import memzoo
from memzoo.bench import cpu_flags
from memzoo.io import write_text_atomic
from memzoo.tasks.booksum_eval import probe_booksum
from memzoo.units import parse_length


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a memzoo checkpoint folder (or a run's model/)")
    parser.add_argument("--lengths", nargs="+", default=["1K", "4K"], help="book lengths in tokens")
    parser.add_argument("--n-books", type=int, default=8)
    parser.add_argument("--n-events", type=int, default=4)
    parser.add_argument("--n-chapters", type=int, default=4)
    parser.add_argument("--no-generate", action="store_true", help="skip greedy decoding (event recall)")
    parser.add_argument("--out", type=Path, default=Path("runs/booksum-probe/probe.json"))
    args = parser.parse_args(argv)
    if args.n_books < 1:
        parser.error("--n-books must be at least 1")
    lengths = [parse_length(x) for x in args.lengths]
    torch.set_num_threads(1)
    model = memzoo.load(args.checkpoint).eval()
    result = probe_booksum(model, lengths=lengths, n_books=args.n_books, n_events=args.n_events,
                           n_chapters=args.n_chapters, generate=not args.no_generate)  # fmt: skip
    result |= {"checkpoint": args.checkpoint, "machine": {"cpu_flags": cpu_flags()},
               "command": shlex.join(["python", "recipes/booksum_probe.py", *(argv if argv is not None else sys.argv[1:])])}  # fmt: skip
    write_text_atomic(args.out, json.dumps(result, indent=1))
    for cell in result["cells"]:
        roles = ", ".join(f"{k} {v:.2f}" for k, v in cell["fact_ce_by_role"].items())
        recall = "-" if cell["event_recall"] is None else f"{cell['event_recall']:.2f}"
        facts = f"facts {cell['fact_ce']:.2f} ({roles})"
        print(f"{cell['length']:>7} tokens: {facts}, template {cell['template_ce']:.3f}, event recall {recall}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
