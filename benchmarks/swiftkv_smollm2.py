"""SwiftKV on the embedded SmolLM2-135M (30 layers), original and converted models
measured in one sitting, interleaved: prefill time at l = 15 (with and without
AcrossKV-2) against the original at CONTEXT prompt tokens, and KV bytes held after the
prefill, with the full cache and with ada-snapkv at keep 0.25 on top.

    .venv/bin/python benchmarks/swiftkv_smollm2.py --context 2048 --repeats 3 --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from kvsqueeze.bench.runner import bench_inputs, measure
from kvsqueeze.hf import KVSqueezeCache
from kvsqueeze.hf.models import load_model
from kvsqueeze.policy import make_policy
from kvsqueeze.swiftkv import convert


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kv-layer", type=int, default=15)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    original, tokenizer = load_model("smollm2-135m")
    models = {
        "original": original,
        f"swiftkv l={args.kv_layer}": convert(original, kv_layer=args.kv_layer),
        f"swiftkv l={args.kv_layer} across-kv 2": convert(original, kv_layer=args.kv_layer, across_group=2),
    }
    ids = bench_inputs(tokenizer, args.context, 1, "cpu")
    with KVSqueezeCache(original, make_policy("full")) as cache:  # warm-up
        measure(original, ids[:, :256], cache, 1, "warm-up")
    prefill = {name: [] for name in models}
    kv = {}
    for _ in range(args.repeats):
        for name, model in models.items():
            with KVSqueezeCache(model, make_policy("full")) as cache:
                row = measure(model, ids, cache, 1, name)
            prefill[name].append(row.prefill_seconds)
            kv[(name, "full")] = row.kv_bytes_stored
    for name, model in models.items():
        with KVSqueezeCache(model, make_policy("ada-snapkv", keep=0.25)) as cache:
            kv[(name, "ada-snapkv 0.25")] = measure(model, ids, cache, 1, name).kv_bytes_stored
    base_time = statistics.median(prefill["original"])
    base_bytes = kv[("original", "full")]
    rows = []
    for name in models:
        t = statistics.median(prefill[name])
        rows.append(
            {
                "model": name,
                "prefill_seconds_median": round(t, 3),
                "prefill_seconds_all": [round(x, 3) for x in prefill[name]],
                "prefill_ratio": round(t / base_time, 3),
                "kv_bytes_full_policy": kv[(name, "full")],
                "kv_ratio_full_policy": round(kv[(name, "full")] / base_bytes, 4),
                "kv_bytes_ada_snapkv_0.25": kv[(name, "ada-snapkv 0.25")],
                "kv_ratio_ada_snapkv_0.25": round(kv[(name, "ada-snapkv 0.25")] / base_bytes, 4),
            }
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"prefill_kv_{args.context}.json").write_text(json.dumps(rows, indent=1))
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
