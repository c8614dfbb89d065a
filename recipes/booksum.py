"""Book summarization recipe: train, evaluate (ROUGE) and compare memory designs on long books.

A thin script over the ``memzoo booksum`` console command (the same arguments)::

    nice -n 10 python recipes/booksum.py train --config recipes/configs/booksum/infini.yaml --out runs/booksum-infini
    python recipes/booksum.py ship --run runs/booksum-infini --config recipes/configs/booksum/infini.yaml --out checkpoints/booksum-infini
    python recipes/booksum.py derive --from checkpoints/booksum-full --memory namm --set budget=512 evict_every=256 \\
        --out checkpoints/booksum-namm
    python recipes/booksum.py compare --lengths 64K --n-books 3    # held-out synthetic books -> runs/booksum/*.json
    python recipes/booksum.py eval --hf path/to/llama --cache h2o --budget 1024 --data booksum --limit 10

Configs live in ``recipes/configs/booksum/``; see ``memzoo booksum --help``.
"""

import sys

from memzoo.cli import main

if __name__ == "__main__":
    sys.exit(main(["booksum", *sys.argv[1:]]))
