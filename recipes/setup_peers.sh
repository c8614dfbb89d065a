#!/usr/bin/env bash
# The public implementations that `memzoo bench` measures side by side with memzoo, in their own
# environment (they are not memzoo dependencies):
#   titans-pytorch               (lucidrains) NeuralMemory          vs memzoo's Titans memory
#   infini-transformer-pytorch   (lucidrains) InfiniTransformer     vs memzoo `infini`
# torch is pinned so that nothing pulls the CUDA stack (an unpinned torch brings GBs of it).
#
#   bash recipes/setup_peers.sh            # creates .venv-peers at the repository root
#   PEERS_VENV=/tmp/peers bash recipes/setup_peers.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${PEERS_VENV:-.venv-peers}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet torch==2.13.0 titans-pytorch infini-transformer-pytorch
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
print({p: md.version(p) for p in ("torch", "titans-pytorch", "infini-transformer-pytorch")})
PY
echo "peers ready in $VENV (memzoo bench --peers-python $VENV/bin/python)"
