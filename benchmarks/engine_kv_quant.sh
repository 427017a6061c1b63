#!/usr/bin/env bash
# The engine with a KIVI-quantized KV cache (docs/results/kv_quantization/engine):
# bench-engine at 16 bits, 4 bits (G=32) and 4 bits (G=256), one after the other in one
# sitting, same workload and KV memory. Each row set goes to a JSON file; the load
# average before and after each run goes to the log (the machine is shared).
set -euo pipefail
cd "$(dirname "$0")/.."
out=docs/results/kv_quantization/engine
mkdir -p "$out"
common=(--model smollm2-135m --policies full,ada-snapkv --keep 0.125 --num-prompts 16 --prompt-len 2048
        --output-len 128 --kv-memory 256MiB --dtype bf16 --json)
run() {
  local name=$1; shift
  echo "$(date -u +%FT%TZ) start $name: kvsqueeze bench-engine ${common[*]} $*  load: $(cut -d' ' -f1-3 /proc/loadavg)"
  .venv/bin/kvsqueeze bench-engine "${common[@]}" "$@" > "$out/$name.json"
  echo "$(date -u +%FT%TZ) end   $name  load: $(cut -d' ' -f1-3 /proc/loadavg)"
}
run kv16 --kv-bits 16
run kv4_g32 --kv-bits 4
run kv4_g256 --kv-bits 4 --kv-group 256
# A second pass over ada-snapkv alone (the runs above differed by 2.5x in its time: check the noise).
common=(--model smollm2-135m --policies ada-snapkv --keep 0.125 --num-prompts 16 --prompt-len 2048
        --output-len 128 --kv-memory 256MiB --dtype bf16 --json)
run ada_kv16_again --kv-bits 16
run ada_kv4_g32_again --kv-bits 4
