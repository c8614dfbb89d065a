"""Passkey retrieval recipe: train, ship, derive, evaluate, compare (same as `memzoo passkey ...`).

    python recipes/passkey.py train --config recipes/configs/passkey/infini.yaml --out runs/passkey-infini
    python recipes/passkey.py ship --run runs/passkey-infini --config recipes/configs/passkey/infini.yaml \
        --out checkpoints/passkey-infini
    python recipes/passkey.py eval --checkpoint checkpoints/passkey-infini --max-length 1M
    python recipes/passkey.py compare             # every checkpoints/passkey-* side by side

See `python recipes/passkey.py --help` and docs/guides/reproduce.md for the exact commands behind
every number in the docs.
"""

import sys

from memzoo.cli import main

if __name__ == "__main__":
    sys.exit(main(["passkey", *sys.argv[1:]]))
