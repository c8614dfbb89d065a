#!/usr/bin/env bash
# memzoo.hf.EvictingCache vs kvpress's matching presses: the same Llama weights, each side in its own
# environment (kvpress pins transformers < 5.3), one thread; see recipes/bench_hf_generate.py.
#   bash recipes/bench_hf_generate.sh                 # -> runs/bench-hf/{memzoo,kvpress,summary}.json
#   OUT=docs/results/bench/hf-generate bash recipes/bench_hf_generate.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/bench-hf}"
KVPRESS_VENV="${KVPRESS_VENV:-.venv-kvpress}"
if [ ! -x "$KVPRESS_VENV/bin/python" ]; then
  python3 -m venv "$KVPRESS_VENV" && "$KVPRESS_VENV/bin/pip" install -q torch==2.13.0 && "$KVPRESS_VENV/bin/pip" install -q kvpress
fi
export OMP_NUM_THREADS=1
.venv/bin/python recipes/bench_hf_generate.py memzoo --out "$OUT" --model runs/bench-hf/model "$@"
"$KVPRESS_VENV/bin/python" recipes/bench_hf_generate.py kvpress --out "$OUT" --model runs/bench-hf/model "$@"
.venv/bin/python recipes/bench_hf_generate.py summary --out "$OUT"
