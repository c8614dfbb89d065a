#!/usr/bin/env bash
# The passkey grid behind docs/results/passkey: every length x 5 depths for each shipped checkpoint
# named on the command line (default: all), appended to $OUT/<design>.json (default runs/passkey-grid;
# the docs' grid is refreshed with OUT=docs/results/passkey).
# Keys per cell shrink with length so the grid fits a CPU session: 3 keys up to 64K, 2 at 256K,
# 1 at 1M (the cost of a cell grows with length x keys). `full` keeps
# every token, so it runs to 16K only. A rerun skips what is finished (`memzoo passkey eval`
# resumes), so it can be stopped and started again.
#   OMP_NUM_THREADS=1 OUT=docs/results/passkey bash recipes/passkey_grid.sh infini titans-mac
# MEMORY_OFF=1 runs the memory-off controls instead ($OUT/<design>-memory-off.json; `full` has none;
# the docs' controls: OUT=docs/results/passkey-control), and MAX_LENGTH=16K stops the grid there:
#   OMP_NUM_THREADS=1 MEMORY_OFF=1 MAX_LENGTH=16K OUT=docs/results/passkey-control bash recipes/passkey_grid.sh
set -euo pipefail
cd "$(dirname "$0")/.."
designs=("$@")
if [ ${#designs[@]} -eq 0 ]; then
  designs=(full window sinks h2o l2 namm namm-paper infini infini-linear infini-deltanet titans-mac titans-mag titans-mal titans-lmm)
fi
out=${OUT:-runs/passkey-grid}
max=${MAX_LENGTH:-1M}
extra=()
if [ -n "${MEMORY_OFF:-}" ]; then extra=(--memory-off); fi
fits() { [ "$(python -c "import sys; from memzoo.units import parse_length as p; print(int(p(sys.argv[1]) <= p(sys.argv[2])))" "$1" "$max")" = 1 ]; }
for design in "${designs[@]}"; do
  if [ "$design" = full ] && [ -n "${MEMORY_OFF:-}" ]; then
    continue  # full keeps every token: no memory to switch off
  fi
  eval_cmd=(memzoo passkey eval --checkpoint "checkpoints/passkey-$design" --out "$out" --quiet --max-length "$max" "${extra[@]}")
  if [ "$design" = full ]; then
    "${eval_cmd[@]}" --lengths 1K 4K 16K --n-keys 3
    continue
  fi
  "${eval_cmd[@]}" --lengths 1K 4K 16K 64K --n-keys 3
  if fits 256K; then "${eval_cmd[@]}" --lengths 256K --n-keys 2; fi
  if fits 1M; then "${eval_cmd[@]}" --lengths 1M --n-keys 1; fi
done
