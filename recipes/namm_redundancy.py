"""NAMM with the key-redundancy feature: ship the hand-set rule scorer and the passkey checkpoint.

The paper's features (attention spectrogram + age) barely tell a needle from the repeated filler
around it; a 26th feature, each cached token's largest key cosine with a newer cached token
(``memzoo.memories.namm.key_redundancy``), does. This recipe writes the scorer of the rule
``score = threshold - key redundancy`` (``memzoo.memories.namm.redundancy_rule``) and the passkey
checkpoint that uses it on the shipped backbone, at the same budget as every other eviction design:

    python recipes/namm_redundancy.py     # -> checkpoints/namm-redundancy-scorer, checkpoints/passkey-namm
    memzoo passkey eval --checkpoint checkpoints/passkey-namm --lengths 1K 4K 16K 64K --n-keys 5

The scorer is set by hand, not evolved: it is the starting point that evolution refines.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from memzoo.cli import main as memzoo_main
from memzoo.memories.namm import redundancy_rule, save_namm_parameters

CARD = """---
library_name: memzoo
tags: [memzoo, namm, kv-cache]
---
# namm-redundancy-scorer

A NAMM scorer (the BAM network of arXiv 2410.13166, 26 features: the paper's 25 plus key redundancy) set by hand
to the rule `score = {threshold} - key redundancy`: a cached token stays unless a newer cached token of the same
head has a key with cosine similarity above {threshold} (a later copy of the same content). Not evolved.

```python
import memzoo
from memzoo.memories.namm import load_namm_parameters, set_namm_parameters
model = memzoo.swap_memory(memzoo.load("checkpoints/passkey-full"), "namm", budget=256, evict_every=128,
                           key_redundancy=True, n_recent={n_recent})
set_namm_parameters(model, load_namm_parameters("checkpoints/namm-redundancy-scorer"))
```

Made by: `{command}`
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threshold", type=float, default=0.95, help="key cosine above which a token is a copy of a newer one")
    parser.add_argument("--n-recent", type=int, default=128, help="most recent stream tokens that always stay")
    parser.add_argument("--backbone", default="checkpoints/passkey-full")
    parser.add_argument("--scorer-out", type=Path, default=Path("checkpoints/namm-redundancy-scorer"))
    parser.add_argument("--out", default="checkpoints/passkey-namm")
    args = parser.parse_args(argv)
    save_namm_parameters(args.scorer_out / "namm.safetensors", redundancy_rule(args.threshold))
    command = "python recipes/namm_redundancy.py" + "".join(f" {a}" for a in (argv or []))
    (args.scorer_out / "README.md").write_text(CARD.format(threshold=args.threshold, n_recent=args.n_recent, command=command))
    return memzoo_main(["passkey", "derive", "--from", args.backbone, "--memory", "namm",
                        "--set", "budget=256", "evict_every=128", "key_redundancy=true", f"n_recent={args.n_recent}",
                        "--scorer", str(args.scorer_out), "--out", args.out])  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
