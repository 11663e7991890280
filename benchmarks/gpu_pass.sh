#!/usr/bin/env bash
# The whole GPU pass in one call on a lent GPU machine (torch, triton and nvcc preinstalled, no network), in
# priority order, each stage writing its results as soon as it ends, into at most 8 files under $OUT (default
# benchmarks/results/<date>): a GPU window is short (15 minutes in all, machine start included) and only 8 files
# come back from it.
#
#   1. environment.txt  GPU, versions, commit, wheel install, build summary, `evit_kernels info`
#   2. build.log        the extension build (sm_90 only, MAX_JOBS=16)
#   3. correctness.log  kernel correctness: the `gpu` tests with EVIT_REQUIRE_EXTENSION=1, one pytest per file
#   4. ceilings.json    measured copy bandwidth and matmul peaks of this GPU
#   5. released_ops.json every distinct op call of the released models on every backend: checked, timed, and
#                       predicted (benchmarks/released_ops.py); `benchmarks/record_measured.py` turns it into
#                       the automatic choice's table
#   6. models.json      whole models: eager, torch.compile, this package's kernels (benchmarks/bench_models.py)
#   7. ops.json         per-op timings (pytest-benchmark: every variant of every op benchmark)
#   8. stages.log       each stage's command, exit status and seconds; the benchmark summaries
#
# Each stage has a time limit (LIMIT below, seconds), sized so that the whole pass fits the window after the
# machine's start: a stage that runs out is stopped (SIGINT: pytest still writes its report and benchmark JSON,
# released_ops.json holds every model finished) and the next one starts. PASS_BUDGET_S, when set, caps the pass as
# a whole: a stage gets at most what is left of it, and none starts with under a minute left. Stage names given as
# arguments run only those stages (`gpu_pass.sh models ops`: a second call on the still-warm machine, where the
# first call's build is kept).
#
# Not in the pass: benchmarks/bench_diffusers.py (Sana and DC-AE at their released shapes). torch.compile of the
# Sana transformers is expected to take minutes, beyond this budget, and its results would be a ninth file; it runs on its own
# (its docstring says how) in a GPU window of its own.
#
# `--dry-run` runs every stage on this CPU instead, through the Triton interpreter at the benchmarks' tiny CPU
# shapes, with a minimal timing budget, and lists the files it wrote: proof that the pass works before device
# time is spent. The machine has no PyPI: `make gpu-wheels` here first puts timm, efficientsam and
# pytest-benchmark with their pure-Python dependencies in .gpu_wheels/, which the device call must carry.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
[ "${1:-}" = "--dry-run" ] && { DRY_RUN=1; shift; }
STAGES=("$@")
declare -A LIMIT=([environment]=60 [build]=240 [correctness]=240 [ceilings]=60 [released_ops]=240 [models]=200
                  [ops]=200)
OUT="${OUT:-benchmarks/results/$(date +%Y%m%d-%H%M)}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
status=0

# stage NAME COMMAND...: unless other stages were asked for, run COMMAND within LIMIT[NAME] seconds (and within
# what is left of PASS_BUDGET_S, when set), append its exit status (124: out of time) and seconds to stages.log,
# remember a failure.
stage() {
  local name="$1" began=$SECONDS rc limit="${LIMIT[$1]}"
  shift
  if [ ${#STAGES[@]} -gt 0 ] && [[ ! " ${STAGES[*]} " =~ " $name " ]]; then
    return
  fi
  if [ "${PASS_BUDGET_S:-0}" -gt 0 ]; then
    local left=$((PASS_BUDGET_S - SECONDS - 30))  # 30 s: the last stage's SIGINT grace and the report
    if [ $left -lt 30 ]; then
      echo "$name: not run, $((PASS_BUDGET_S - SECONDS)) s of PASS_BUDGET_S left" >> "$OUT/stages.log"
      status=1
      return
    fi
    [ $left -lt "$limit" ] && limit=$left
  fi
  # a shell function runs under `timeout` through a child bash that knows it
  timeout -s INT -k 20 "$limit" bash -c "$(declare -f "$1")
$(declare -p OUT PY DRY_RUN TEST_MARK TEST_FILES)
\"\$@\"" stage "$@"
  rc=$?
  echo "$name: exit $rc in $((SECONDS - began)) s (limit $limit s)" >> "$OUT/stages.log"
  [ $rc -eq 0 ] || status=1
}

if [ $DRY_RUN -eq 1 ]; then
  # Timing is not the point of a dry run: one round of each benchmark, no extra warm-up.
  export TRITON_INTERPRET=1 EVIT_BENCH_ROUNDS=1
  TEST_MARK="not slow and not gpu"
  TEST_FILES=(tests/test_conv_bn_act_triton.py tests/test_ffn.py tests/test_conv_block.py
              tests/test_relu_linear_attention_triton.py tests/test_cascaded_group_attention_triton.py)
else
  TEST_MARK=gpu
  mapfile -t TEST_FILES < <(grep -l "mark.gpu" tests/test_*.py)
fi

environment() {
  { nvidia-smi 2>&1 || echo "no nvidia-smi (dry run: CPU)"
    "$PY" -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
    git rev-parse HEAD 2>/dev/null
    if [ -d .gpu_wheels ]; then
      "$PY" -m pip install -q --no-index --find-links .gpu_wheels timm efficientsam pytest-benchmark diffusers 2>&1 | tail -3
    fi
  } >> "$OUT/environment.txt" 2>&1
}

build() {
  TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
    "$PY" -m pip install -v --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
  local rc=$?
  grep -E "evit_kernels:|Successfully installed|error" "$OUT/build.log" | cut -c1-200 >> "$OUT/environment.txt"
  # the host compiler and the C++ runtime the extension links: a mismatch crashed it once (csrc/cascaded_*.cu)
  { c++ --version | head -1; ldd evit_kernels/_C*.so | grep -E "libstdc|libgcc"; } >> "$OUT/environment.txt" 2>&1
  "$PY" -m evit_kernels info >> "$OUT/environment.txt" 2>&1
  return $rc
}

# Each test file in a pytest of its own: a crash (the host process killed) loses that file's verdict alone. The log's
# last line says whether every file passed (benchmarks/record_measured.py reads it).
correctness() {
  local file rc=0 file_rc
  for file in "${TEST_FILES[@]}"; do
    echo "## $file" >> "$OUT/correctness.log"
    EVIT_REQUIRE_EXTENSION=$((1 - DRY_RUN)) "$PY" -m pytest -q -p no:cacheprovider --benchmark-disable \
      -m "$TEST_MARK" "$file" >> "$OUT/correctness.log" 2>&1
    file_rc=$?
    echo "## $file: exit $file_rc" >> "$OUT/correctness.log"
    echo "  $file: exit $file_rc, $(grep -E " in [0-9.]+s" "$OUT/correctness.log" | tail -1)" >> "$OUT/stages.log"
    [ $file_rc -eq 0 ] || rc=1
  done
  [ $rc -eq 0 ] && echo "every kernel test file passed" >> "$OUT/correctness.log"
  return $rc
}

released_ops() {
  "$PY" -m benchmarks.released_ops --json "$OUT/released_ops.json" >> "$OUT/stages.log" 2>&1
}

benchmarks() {  # benchmarks JSON FILES...: time the benchmark files into JSON, the summary into stages.log
  local json="$1"
  shift
  "$PY" -m pytest -q -p no:cacheprovider "$@" --benchmark-json "$json" \
    --benchmark-columns=median,rounds >> "$OUT/stages.log" 2>&1
}

stage environment environment
stage build build
stage correctness correctness
stage ceilings "$PY" -m benchmarks.ceilings --json "$OUT/ceilings.json"
stage released_ops released_ops
stage models benchmarks "$OUT/models.json" benchmarks/bench_models.py
stage ops benchmarks "$OUT/ops.json" benchmarks/bench_relu_linear_attention.py \
  benchmarks/bench_cascaded_group_attention.py benchmarks/bench_conv_blocks.py

echo "gpu pass: exit $status; $(find "$OUT" -type f | wc -l) files in $OUT:"
find "$OUT" -type f -printf "  %f (%s bytes)\n" | sort
exit $status
