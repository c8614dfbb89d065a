"""Speed and memory bench of every design, with the public peers side by side (same as `memzoo bench`).

    bash recipes/setup_peers.sh                                     # once: .venv-peers with titans-pytorch, infini-transformer-pytorch
    nice -n 10 python recipes/bench.py --config recipes/configs/bench/default.yaml   # -> runs/bench/ (--out docs/results/bench: the docs')
    python recipes/bench.py --quick                                 # smoke test (< 2 minutes), -> runs/bench-quick/

Every measurement runs in a fresh subprocess (peak RSS per design and length); results already in
OUT/bench.json are kept, so an interrupted bench resumes. See memzoo/bench.py for the method.
"""

import sys

from memzoo.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
