#!/usr/bin/env bash
# The accelerator checks in one command, for a machine with a GPU (or TPU):
#
#     pip install -e '.[cuda,test]'     # once: jax[cuda12], pytest
#     bash experiments/gpu_check.sh [OUTDIR]      # default runs/gpu_check
#
# 1. the tests that need the compiled kernel (tests/ternary: the Pallas kernel against the
#    reference, bit for bit, at decode and training shapes; ternary_dot and its gradients);
# 2. the kernel benchmark (experiments/bench_kernel.py: ternary vs dense bf16 matmuls,
#    tuned tiles, fraction of the measured memory bandwidth at decode);
# 3. the 125m train step (experiments/bench_step.py --config=base, bf16): dense vs the
#    ternary kernel vs fake quantisation, tokens/s and MFU.
# Every table goes to OUTDIR/report.md (and the raw JSON beside it). About 5 minutes on an
# H100/H200; each part has its own time limit so the whole stays under 8. `--allow-cpu`
# runs the same parts on a CPU, smaller, to check the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."

allow_cpu=0
if [ "${1:-}" = "--allow-cpu" ]; then allow_cpu=1; shift; fi
out=${1:-runs/gpu_check}
mkdir -p "$out"
report="$out/report.md"
export PYTHONUNBUFFERED=1 NANOCHAT_TUNE_CACHE="$out/kernel_tiles.json"

backend=$(python -c "import jax; print(jax.default_backend())" 2>/dev/null)
if [ "$backend" = "cpu" ] && [ "$allow_cpu" = 0 ]; then
  echo "error: JAX sees no GPU or TPU here (backend cpu): pip install -e '.[cuda,test]' on a" \
       "GPU machine, or pass --allow-cpu to check the script on a CPU" >&2
  exit 2
fi
if [ "$backend" = "cpu" ]; then
  kernel_args="--rounds=1 --repeats=2"; step_args="--config=tiny --rounds=1 --steps=2"
  tests="tests/ternary/test_kernel.py"
else
  kernel_args="--rounds=3 --repeats=10"
  step_args="--config=base --set=model.compute_dtype=bfloat16 --rounds=3 --steps=5"
  tests="tests/ternary"
fi

status=0
section() {  # section TITLE LIMIT_S COMMAND...: run it, its output into the report
  local title=$1 limit=$2; shift 2
  echo "## $title" | tee -a "$report"
  echo '```' >> "$report"
  echo "\$ $*" | tee -a "$report"
  timeout "$limit" "$@" 2>&1 | tee -a "$report" | tail -n 40
  local rc=${PIPESTATUS[0]}
  echo '```' >> "$report"
  echo "(exit status $rc)" | tee -a "$report"
  [ "$rc" = 0 ] || status=1
}

{
  echo "# Accelerator check, $(date -u +%Y-%m-%dT%H:%MZ)"
  python -c "import jax; d = jax.devices()[0]; print(f'{d.device_kind} ({jax.default_backend()}), {jax.device_count()} device(s), jax {jax.__version__}')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  echo
} > "$report"
cat "$report"

section "Accelerator tests" 120 python -m pytest -q -p no:cacheprovider $tests
section "Kernel benchmark" 120 python -m experiments.bench_kernel $kernel_args --out="$out/kernel.json"
section "Train step" 210 python -m experiments.bench_step $step_args --out="$out/step.json"
echo "wrote $report"
exit $status
