#!/usr/bin/env bash
# Long-gap associative recall behind docs/results/recall: derive the eviction designs from the trained
# recall-full-conv backbone (full attention with a 4-tap conv on q/k/v, which answers 16 pairs where
# recall-full answers one; the same cache settings as their passkey checkpoints), then evaluate every
# checkpoints/recall-* with its memory-off control.
#   OMP_NUM_THREADS=1 OUT=docs/results/recall bash recipes/recall.sh
# The trained checkpoints come first (each resumes if interrupted; equal budgets, see the configs):
#   memzoo recall train --config recipes/configs/recall/full.yaml --out runs/recall-full
#   memzoo recall ship --run runs/recall-full --config recipes/configs/recall/full.yaml --out checkpoints/recall-full
#   (the same for full-conv, infini, infini-deltanet and titans-mag)
# GAPS (default 1K 4K 16K 64K) and VARIANTS (default standard overwrite) choose the cells; `full` keeps every
# token, so it stops at 16K (and answers nothing past its trained 2K rows). Longer gaps for one checkpoint join its results file later:
#   memzoo recall eval --checkpoint checkpoints/recall-infini-deltanet --gaps 256K 1M --out docs/results/recall
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/recall}
read -r -a gaps <<< "${GAPS:-1K 4K 16K 64K}"
read -r -a variants <<< "${VARIANTS:-standard overwrite}"
cache=(--set budget=256 evict_every=128)
for design in window sinks h2o l2; do
  [ -d "checkpoints/recall-$design" ] || memzoo recall derive --from checkpoints/recall-full-conv --memory "$design" "${cache[@]}" --out "checkpoints/recall-$design"
done
[ -d checkpoints/recall-namm ] || memzoo recall derive --from checkpoints/recall-full-conv --memory namm "${cache[@]}" key_redundancy=true n_recent=128 \
  --scorer checkpoints/namm-redundancy-scorer --out checkpoints/recall-namm
opts=(--variants "${variants[@]}" --out "$out" --quiet)
for ckpt in checkpoints/recall-full checkpoints/recall-full-conv; do
  memzoo recall eval --checkpoint "$ckpt" --gaps 1K 4K 16K "${opts[@]}"
done
for ckpt in checkpoints/recall-*; do
  case "$ckpt" in checkpoints/recall-full | checkpoints/recall-full-conv) continue ;; esac
  memzoo recall eval --checkpoint "$ckpt" --gaps "${gaps[@]}" "${opts[@]}"
  memzoo recall eval --checkpoint "$ckpt" --gaps "${gaps[@]}" "${opts[@]}" --memory-off
done
