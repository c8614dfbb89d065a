"""Bit-identity of the eviction designs across a code change: stream fixed inputs, save the logits, compare.

Run once on the code before a change (``--save``), once after (``--compare``): every eviction design
(and ``full``) streams the same random tokens through the same fresh model in calls of several sizes
(one token, a few, an eviction period, longer than one), with the policies' attention statistics
live, and the logits of every token must be equal bit for bit::

    OMP_NUM_THREADS=1 python recipes/eviction_identity.py --save runs/identity/before.safetensors
    # ... change the cache or attention code ...
    OMP_NUM_THREADS=1 python recipes/eviction_identity.py --compare runs/identity/before.safetensors

Sizes are small (d 32 x 2 layers, 400 tokens; budget 48 with an eviction every 16 tokens, and 96 every 80
so that pieces outgrow one block of the explicit attention) so that every path runs many evictions in
seconds; ``namm`` uses its default scorer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import memzoo

DESIGNS = ("full", "window", "sinks", "h2o", "l2", "namm")
CALL_SIZES = (1, 3, 16, 50, 400)
MODEL = {"d_model": 32, "n_layers": 2, "n_heads": 2}
CACHES = {"short": {"budget": 48, "evict_every": 16}, "long": {"budget": 96, "evict_every": 80}}  # pieces of <= 16, <= 80 queries


def logits_of(design: str, cache: str, call_size: int, tokens: int = 400) -> torch.Tensor:
    torch.manual_seed(0)
    extra = {} if design == "full" else dict(CACHES[cache], **({"n_recent": 8} if design in ("h2o", "l2", "namm") else {}))
    model = memzoo.build(design, **MODEL, **extra).eval()
    ids = torch.randint(3, 259, (2, tokens), generator=torch.Generator().manual_seed(1))
    return model.stream(ids, segment_len=call_size, keep_logits=True).logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--save", type=Path, help="write the logits here (safetensors)")
    what.add_argument("--compare", type=Path, help="compare against logits saved by --save")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cases = [(d, cache, c) for d in DESIGNS for cache in (CACHES if d != "full" else ["short"]) for c in CALL_SIZES]
    got = {f"{d}/{cache}/{c}": logits_of(d, cache, c).contiguous() for d, cache, c in cases}
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        save_file(got, str(args.save))
        print(f"wrote {len(got)} logits tensors to {args.save}")
        return
    before = load_file(str(args.compare))
    if before.keys() != got.keys():
        raise SystemExit(f"{args.compare} holds other cases ({sorted(before)[:3]}...): save it again with this script")
    differ = [name for name in got if not torch.equal(got[name], before[name])]
    for name in got:
        diff = (got[name] - before[name]).abs().max().item()
        print(f"{name:>16}: {'identical' if name not in differ else f'DIFFERS, max |diff| {diff:.3g}'}")
    if differ:
        sys.exit(f"{len(differ)} of {len(got)} cases differ")
    print(f"all {len(got)} cases bit-identical")


if __name__ == "__main__":
    main()
