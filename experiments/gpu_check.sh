#!/usr/bin/env bash
# The accelerator checks in one command, for a machine with a GPU (or TPU):
#
#     pip install -e '.[cuda,test]'     # once: jax[cuda12], pytest
#     bash experiments/gpu_check.sh [OUTDIR]      # default runs/gpu_check
#
# 1. the tests that hold on any platform and exercise the compiled kernel there
#    (tests/ternary: the Pallas kernel against the reference, bit for bit, at decode and
#    training shapes, every decode tiling the tuner may try, ternary_dot and its gradients;
#    tests/model/test_packed.py; tests/infer/test_engine.py: the engine's decode, its
#    kernel tiles tuned first). Tests of the CPU-only path skip themselves, saying so;
# 2. the kernel benchmark (experiments/bench_kernel.py: ternary vs dense bf16 matmuls,
#    tuned tiles, fraction of the measured memory bandwidth at decode);
# 3. the 125m train step (experiments/bench_step.py --config=base; bf16, the default on a
#    GPU): dense vs the ternary kernel vs fake quantisation, tokens/s and MFU against the
#    chip's datasheet bf16 peak.
# Each part appends its output to OUTDIR/report.md as it runs and the benchmarks rewrite
# their JSON after every row, so a part cut off by its time limit leaves what it measured.
# The limits (270 + 150 + 180 s) keep the whole under 10 minutes.
#
# `--allow-cpu` is the dry run, on a CPU: the same test selection with the code's platform
# decisions made as on a GPU (NANOCHAT_TEST_AS_BACKEND=gpu, tests/conftest.py: a test whose
# expectation holds only on a CPU fails there), then both benchmarks, smaller. CI runs it.
set -uo pipefail
cd "$(dirname "$0")/.."

allow_cpu=0
if [ "${1:-}" = "--allow-cpu" ]; then allow_cpu=1; shift; fi
out=${1:-runs/gpu_check}
mkdir -p "$out"
report="$out/report.md"
export PYTHONUNBUFFERED=1
tiles="$out/kernel_tiles.json"  # the benchmarks' tuned tiles (the tests keep their own)
TESTS=(tests/ternary tests/model/test_packed.py tests/infer/test_engine.py)

backend=$(python -c "import nanochat_jax, jax; print(jax.default_backend())" 2>/dev/null)
if [ "$backend" = "cpu" ] && [ "$allow_cpu" = 0 ]; then
  echo "error: JAX sees no GPU or TPU here (backend cpu): pip install -e '.[cuda,test]' on a" \
       "GPU machine, or pass --allow-cpu to check the script on a CPU" >&2
  exit 2
fi
if [ "$backend" = "cpu" ]; then
  test_command=(env NANOCHAT_TEST_AS_BACKEND=gpu python -m pytest -q -p no:cacheprovider
                -n auto "${TESTS[@]}")
  test_limit=900
  kernel_args="--rounds=1 --repeats=2"; step_args="--config=tiny --rounds=1 --steps=2"
else  # one process, the tests one at a time on the one GPU
  test_command=(python -m pytest -q -p no:cacheprovider "${TESTS[@]}")
  test_limit=270
  kernel_args="--rounds=3 --repeats=10"
  step_args="--config=base --rounds=3 --steps=5"
fi

status=0
section() {  # section TITLE LIMIT_S COMMAND...: run it, its output into the report as it comes
  local title=$1 limit=$2; shift 2
  echo "## $title" | tee -a "$report"
  echo '```' >> "$report"
  echo "\$ $*" | tee -a "$report"
  timeout "$limit" "$@" 2>&1 | tee -a "$report" | tail -n 40
  local rc=${PIPESTATUS[0]}
  echo '```' >> "$report"
  if [ "$rc" = 124 ]; then
    echo "(stopped by its ${limit} s limit; what it wrote above and in $out stays)" | tee -a "$report"
  fi
  echo "(exit status $rc)" | tee -a "$report"
  [ "$rc" = 0 ] || status=1
}

{
  echo "# Accelerator check, $(date -u +%Y-%m-%dT%H:%MZ)"
  python -c "import nanochat_jax, jax; d = jax.devices()[0]; print(f'{d.device_kind} ({jax.default_backend()}), {jax.device_count()} device(s), jax {jax.__version__}')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  echo
} > "$report"
cat "$report"

section "Accelerator tests" "$test_limit" "${test_command[@]}"
section "Kernel benchmark" 150 env NANOCHAT_TUNE_CACHE="$tiles" \
  python -m experiments.bench_kernel $kernel_args --out="$out/kernel.json"
section "Train step" 180 env NANOCHAT_TUNE_CACHE="$tiles" \
  python -m experiments.bench_step $step_args --out="$out/step.json"
echo "wrote $report"
exit $status
