#!/usr/bin/env bash
# Evaluation sweeps of the embedded model (SmolLM2-135M). Resumable: rerun the same
# command to finish an interrupted sweep (rows already in results.jsonl are skipped).
#
#   benchmarks/eval_smollm2.sh            issue 11's statistics sweep -> docs/results/quality_sweep/
#   benchmarks/eval_smollm2.sh legacy     the earlier sweep           -> docs/results/smollm2-135m/
#
# quality (default): the needle task at 2k and 4k tokens, 5 needles per length (depths
# 0.1..0.9, one sample each), question-aware and question-agnostic, 22 policies at keep
# 0.1 / 0.25 / 0.5, seed 0; then perplexity at 2k (and 4k) with 2 samples. summary.md
# gives every mean with a bootstrap 95% interval and pairs each Ada variant with its
# uniform twin (wins / ties / losses, sign test).
# Rows do not depend on the order they are run in (each is keyed on its settings,
# sample, policy and budget), so the commands below can run in any order or split:
# docs/results/quality_sweep was run as the two modes in parallel processes
# (OMP_NUM_THREADS=1 each), first with the POLICIES_CORE set, then adding POLICIES_EXTRA,
# into separate folders whose rows were concatenated.
set -euo pipefail
cd "$(dirname "$0")/.."
SWEEP=${1:-quality}
EVAL=(.venv/bin/kvsqueeze eval --model smollm2-135m --seed 0)

if [ "$SWEEP" = quality ]; then
  OUT=${OUT:-docs/results/quality_sweep}
  POLICIES_CORE=full,streamingllm,snapkv,ada-snapkv,tova-head,ada-tova-head,h2o,ada-h2o,expected-attention,kvzip,ada-kvzip,criticalkv,ada-criticalkv,defensivekv,ada-defensivekv
  POLICIES_EXTRA=knorm,pyramidkv,ada-pyramidkv,tova,ada-tova,chunkkv,cross-snapkv
  POLICIES=$POLICIES_CORE,$POLICIES_EXTRA
  for mode in "" "--question-agnostic"; do
    "${EVAL[@]}" --task needle --policies "$POLICIES" --keep 0.1,0.25,0.5 \
      --lengths 2048,4096 --depths 0.1,0.3,0.5,0.7,0.9 --samples 1 --out "$OUT" $mode
  done
  "${EVAL[@]}" --task ppl --policies "$POLICIES" --keep 0.1,0.25,0.5 --lengths 2048 --samples 2 --out "$OUT"
  "${EVAL[@]}" --task ppl --policies "$POLICIES" --keep 0.1,0.25,0.5 --lengths 4096 --samples 2 --out "$OUT"
elif [ "$SWEEP" = legacy ]; then
  # docs/results/smollm2-135m/summary.md: needle and RULER-style tasks at 2k and 4k,
  # both modes, seven policies at keep 0.1, 0.2, 0.4 (rows measured before issue 11's
  # policy changes; rerunning it today gives today's policies).
  OUT=${OUT:-docs/results/smollm2-135m}
  POLICIES=full,streamingllm,h2o,snapkv,pyramidkv,ada-snapkv,ada-pyramidkv
  for mode in "" "--question-agnostic"; do
    for task in needle ruler; do
      "${EVAL[@]}" --task "$task" --policies "$POLICIES" --keep 0.1,0.2,0.4 \
        --lengths 2048,4096 --depths 0.1,0.5,0.9 --samples 1 --out "$OUT" $mode
    done
  done
  "${EVAL[@]}" --task ppl --policies "$POLICIES" --keep 0.1,0.2,0.4 \
    --lengths 2048,4096 --samples 2 --out "$OUT"
else
  echo "usage: $0 [quality|legacy]" >&2
  exit 2
fi
