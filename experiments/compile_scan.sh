#!/usr/bin/env bash
# BUILD.md's scan table: the 7b train step (the base run, bf16, remat full) compiled for a
# v5p-4 with the blocks unrolled and scanned (`model.scan_layers`), plain and with 4 LoopLM
# loops; compile seconds and per-device bytes from experiments.compile, the host's peak RSS
# from /usr/bin/time. About 20 minutes on 2 CPU cores (the unrolled ones dominate); run it
# on an otherwise idle machine, it times compiles.
#
#     bash experiments/compile_scan.sh [OUT.jsonl]     # default runs/compile/scan.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/compile/scan.jsonl}
mkdir -p "$(dirname "$out")"
: > "$out"
for loops in 1 4; do
  for scan in True False; do
    echo "== 7b loops=$loops scan_layers=$scan" >&2
    /usr/bin/time -f "host peak RSS %M KB, wall %e s" \
      python -m experiments.compile --config=base --config.model.preset=7b \
      --config.model.compute_dtype=bfloat16 --config.model.remat=full \
      --config.model.scan_layers=$scan --config.loop.enabled=$([ $loops = 1 ] && echo False || echo True) \
      --config.loop.max_loops=$loops --topology=v5p:2x2x1 --mesh=data=1,fsdp=4 \
      --decode_batch=0 --out="$out" 2>&1 | grep -E "^\| train|host peak|error" >&2
  done
done
python -m experiments.compile --render="$out"
