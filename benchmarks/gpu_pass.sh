#!/usr/bin/env bash
# The whole GPU pass in one call on a lent GPU machine (torch, triton and nvcc preinstalled, no network):
# ceilings, build, `gpu` tests, benchmarks. Everything lands in $OUT (default benchmarks/results/<date>).
#
# The machine has no PyPI: `make gpu-wheels` here first puts timm, efficientsam and pytest-benchmark with
# their pure-Python dependencies in .gpu_wheels/, which the device call must carry.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/$(date +%Y%m%d-%H%M)}"
mkdir -p "$OUT"
status=0

{ nvidia-smi; python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  > "$OUT/environment.txt" 2>&1
if [ -d .gpu_wheels ]; then
  python -m pip install -q --no-index --find-links .gpu_wheels timm efficientsam pytest-benchmark \
    > "$OUT/wheels.log" 2>&1 || status=1
fi
MAX_JOBS="${MAX_JOBS:-16}" python -m pip install -v --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
  || { echo "build failed: see $OUT/build.log"; status=1; }
python -m evit_kernels info | tee "$OUT/info.txt"
python benchmarks/ceilings.py --json "$OUT/ceilings.json" | tee "$OUT/ceilings.txt"
EVIT_REQUIRE_EXTENSION=1 python -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
python -m pytest -q benchmarks --benchmark-json "$OUT/benchmarks.json" 2>&1 | tee "$OUT/benchmarks.log" | tail -30
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
