#!/usr/bin/env bash
# BUILD.md's pod tables: the train and decode steps of the presets compiled for TPU topologies
# or for H100s on this machine (no accelerator needed), then the table rendered from the rows.
#
#     bash experiments/compile_table.sh [tpu|gpu] [OUT.jsonl]   # default tpu, runs/compile/<kind>.jsonl
#
# tpu: libtpu (`pip install -e '.[tpu]'`), about 40 minutes on 2 CPU cores (the 7b compiles
# dominate). gpu: jax's CUDA plugin and compiler (`pip install -e '.[cuda]'`, a virtualenv of
# its own is best: every JAX process on a host without a GPU driver warns otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
kind=${1:-tpu}
out=${2:-runs/compile/$kind.jsonl}
mkdir -p "$(dirname "$out")"
: > "$out"
# every row: the base run (AdamW, batch 32 x 1024) in bf16 compute (the default where the
# step is compiled for a GPU or TPU; the TPU rows name it, as they did before it was)
row() {  # row PRESET TOPOLOGY MESH [--config.X=Y ...]
  local preset=$1 topology=$2 mesh=$3; shift 3
  echo "== $preset $topology $mesh $*" >&2
  python -m experiments.compile --config=base --config.model.preset="$preset" \
    "$@" --topology="$topology" --mesh="$mesh" --out="$out" | tail -n 3 >&2
}
if [ "$kind" = tpu ]; then
  bf16=--config.model.compute_dtype=bfloat16
  row 125m v5e:2x2 data=1,fsdp=4 $bf16
  row 125m v5e:2x2 data=1,fsdp=4 $bf16 --config.model.ternary_product=fake_quant
  row 125m v5e:2x2 data=2,tensor=2 $bf16
  row 1b v5e:2x2 data=1,fsdp=4 $bf16
  row 1b v5e:2x2 data=1,fsdp=4 $bf16 --config.model.remat=full
  row 1b v5e:2x2 data=1,fsdp=4 $bf16 --config.model.remat=full --config.model.ternary_product=fake_quant
  row 1b v6e:2x2 data=1,fsdp=4 $bf16
  row 3b v5e:2x2 data=1,fsdp=4 $bf16 --config.model.remat=full
  row 3b v4:2x2x1 data=1,fsdp=4 $bf16 --config.model.remat=full
  row 3b v5p:2x2x1 data=1,fsdp=4 $bf16 --config.model.remat=full
  row 7b v5p:2x2x1 data=1,fsdp=4 $bf16
  row 7b v5p:2x2x1 data=1,fsdp=4 $bf16 --config.model.remat=full
  row 7b v6e:2x2 data=1,fsdp=4 $bf16 --config.model.remat=full
  row 7b v5e:4x4 data=1,fsdp=16 $bf16 --config.model.remat=full
elif [ "$kind" = gpu ]; then
  export JAX_PLATFORMS=cpu JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1
  row 125m h100 data=1
  row 125m h100 data=1 --config.model.ternary_product=fake_quant
  row 125m h100x8 data=1,fsdp=8
  row 125m h100x8 data=1,fsdp=4,tensor=2
  row 1b h100 data=1
  row 1b h100 data=1 --config.model.remat=full
  row 1b h100 data=1 --config.model.remat=full --config.model.ternary_product=fake_quant
  row 1b h100x8 data=1,fsdp=8
  row 1b h100x8 data=1,fsdp=4,tensor=2
  row 3b h100 data=1 --config.model.remat=full
  row 3b h100x8 data=1,fsdp=8
  row 3b h100x8 data=1,fsdp=8 --config.model.remat=full
  row 3b h100x8 data=1,fsdp=4,tensor=2 --config.model.remat=full
  row 7b h100 data=1 --config.model.remat=full
  row 7b h100x8 data=1,fsdp=8
  row 7b h100x8 data=1,fsdp=8 --config.model.remat=full
  row 7b h100x8 data=1,fsdp=8 --config.model.remat=full --config.model.ternary_product=fake_quant
  row 7b h100x8 data=1,fsdp=4,tensor=2 --config.model.remat=full
else
  echo "error: the first argument is tpu or gpu, got '$kind'" >&2
  exit 2
fi
python -m experiments.compile --render="$out"
