#!/usr/bin/env bash
# The teacher-forced probe behind docs/results/passkey-probe: for each shipped checkpoint named on
# the command line (default: all), the answer's cross-entropy at 512, 1K and 4K tokens x 5 depths,
# 8 prompts per cell (`memzoo passkey probe`). Where the greedy grid says only "wrong", this says
# how wrong: ln 10 = 2.30 nats per digit is chance, the key never reached the question.
# Writes $OUT/<design>.json (default runs/passkey-probe; the docs' own: OUT=docs/results/passkey-probe).
#   OMP_NUM_THREADS=1 OUT=docs/results/passkey-probe bash recipes/passkey_probe.sh infini titans-mac
set -euo pipefail
cd "$(dirname "$0")/.."
designs=("$@")
if [ ${#designs[@]} -eq 0 ]; then
  designs=(full window sinks h2o l2 namm infini infini-linear infini-deltanet titans-mac titans-mag titans-mal titans-lmm)
fi
out=${OUT:-runs/passkey-probe}
for design in "${designs[@]}"; do
  memzoo passkey probe --checkpoint "checkpoints/passkey-$design" --lengths 512 1K 4K --rows 8 --quiet --out "$out/$design.json"
done
