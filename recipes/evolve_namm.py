"""Evolve a NAMM scorer for a trained memzoo backbone (CMA-ES), then ship it.

    python recipes/evolve_namm.py --config recipes/configs/evolve/namm.yaml
    torchrun --nproc-per-node 2 recipes/evolve_namm.py --config recipes/configs/evolve/namm.yaml

The same as ``memzoo namm evolve``; see ``memzoo.training.evolution``.
"""

import sys

from memzoo.cli import main

if __name__ == "__main__":
    sys.exit(main(["namm", "evolve", *sys.argv[1:]]))
