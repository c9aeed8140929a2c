#!/usr/bin/env bash
# BUILD.md's pod table: the train and decode steps of the presets compiled for TPU
# topologies on this machine (no TPU needed: libtpu, `pip install -e '.[tpu]'`), then the
# table rendered from the rows. About 40 minutes on 2 CPU cores (the 7b compiles dominate).
#
#     bash experiments/compile_table.sh [OUT.jsonl]     # default runs/compile/table.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/compile/table.jsonl}
mkdir -p "$(dirname "$out")"
: > "$out"
# every row: the base run (AdamW, batch 32 x 1024) in bf16 compute
row() {  # row PRESET TOPOLOGY MESH [--config.X=Y ...]
  local preset=$1 topology=$2 mesh=$3; shift 3
  echo "== $preset $topology $mesh $*" >&2
  python -m experiments.compile --config=base --config.model.preset="$preset" \
    --config.model.compute_dtype=bfloat16 --topology="$topology" --mesh="$mesh" "$@" \
    --out="$out" | tail -n 3 >&2
}
row 125m v5e:2x2 data=1,fsdp=4
row 125m v5e:2x2 data=1,fsdp=4 --config.model.ternary_impl=fake_quant
row 125m v5e:2x2 data=2,tensor=2
row 1b v5e:2x2 data=1,fsdp=4
row 1b v5e:2x2 data=1,fsdp=4 --config.model.remat=full
row 1b v5e:2x2 data=1,fsdp=4 --config.model.remat=full --config.model.ternary_impl=fake_quant
row 1b v6e:2x2 data=1,fsdp=4
row 3b v5e:2x2 data=1,fsdp=4 --config.model.remat=full
row 3b v4:2x2x1 data=1,fsdp=4 --config.model.remat=full
row 3b v5p:2x2x1 data=1,fsdp=4 --config.model.remat=full
row 7b v5p:2x2x1 data=1,fsdp=4
row 7b v5p:2x2x1 data=1,fsdp=4 --config.model.remat=full
row 7b v6e:2x2 data=1,fsdp=4 --config.model.remat=full
row 7b v5e:4x4 data=1,fsdp=16 --config.model.remat=full
python -m experiments.compile --render="$out"
