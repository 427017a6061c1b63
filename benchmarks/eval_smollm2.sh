#!/usr/bin/env bash
# The evaluation sweep quoted in docs/results/smollm2-135m/summary.md: needle and
# RULER-style tasks at 2k and 4k tokens, question-aware and question-agnostic, seven
# policies at keep 0.1, 0.2, 0.4. Resumable: rerun it to finish an interrupted sweep.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-docs/results/smollm2-135m}
POLICIES=full,streamingllm,h2o,snapkv,pyramidkv,ada-snapkv,ada-pyramidkv
for mode in "" "--question-agnostic"; do
  for task in needle ruler; do
    .venv/bin/kvsqueeze eval --model smollm2-135m --task "$task" --policies "$POLICIES" --keep 0.1,0.2,0.4 \
      --lengths 2048,4096 --depths 0.1,0.5,0.9 --samples 1 --seed 0 --out "$OUT" $mode
  done
done
.venv/bin/kvsqueeze eval --model smollm2-135m --task ppl --policies "$POLICIES" --keep 0.1,0.2,0.4 \
  --lengths 2048,4096 --samples 2 --seed 0 --out "$OUT"
