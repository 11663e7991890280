SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# pip warns once per missing local index directory on some machines: keep the log readable.
QUIET_PIP := 2>&1 | { grep -v "is ignored: it is neither" || true; }
# Two entry points for a fresh machine (see README): `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON3 ?= python3
# torch 2.14.1 is a CUDA build: the extension compiles against it even on a machine without a GPU.
TORCH ?= torch==2.14.1 torchvision==0.29.1
MODEL ?= efficientvit_b1

.PHONY: setup demo test test-fast test-numerics test-compat lint gpu-pass gpu-pass-dry-run predictions

$(VENV)/.installed: setup.py pyproject.toml $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON3) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH) $(QUIET_PIP)
	# torch named again: otherwise a dependency (timm's torchvision) may bring a newer torch in its place
	$(PY) -m pip install -q $(TORCH) timm efficientsam diffusers peft pytest pytest-benchmark pytest-xdist ninja ruff setuptools wheel onnx onnxruntime hypothesis $(QUIET_PIP)
	# --no-build-isolation: build against the torch installed above, not a fresh copy in an isolated env
	$(PY) -m pip install -v --no-build-isolation --no-deps -e . > $(VENV)/build.log 2>&1 || (cat $(VENV)/build.log; exit 1)
	grep -E "evit_kernels:|/nvcc |c\+\+ .*csrc|Successfully installed" $(VENV)/build.log | cut -c1-160
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m evit_kernels info
	$(PY) -m evit_kernels bench --model $(MODEL)

# One pytest worker per core (pytest-xdist), each taking whole files: a file's module-scoped fixtures (the sm_90
# compiles) then run once. About half the time of one worker on two cores.
PARALLEL := -n auto --dist loadfile

test: setup
	$(PY) -m pytest -q --benchmark-disable $(PARALLEL) --durations=10

# The edit loop: everything but the tests marked slow (whole models, subprocesses, sm_90 compiles), stop at the first failure.
test-fast: setup
	$(PY) -m pytest -q --benchmark-disable -m "not slow" -x

# The tests that compare against eager's own error, again with one thread and ATen's portable CPU kernels (ATen
# picks its kernels by CPU capability), unlike `make test`'s run at the machine's own: their verdict must not depend
# on the machine. One setting, not more: CI's time is bounded.
test-numerics: setup
	OMP_NUM_THREADS=1 ATEN_CPU_CAPABILITY=default $(PY) -m pytest -q --benchmark-disable $(PARALLEL) -m numerics

# The GPU machine's versions (torch 2.11.0, triton 3.6.0, Python 3.12), proven on this CPU before device time is
# spent: a second venv with them (its own extension build: _C.cpython-312-*.so beside .venv's -311 one), then the
# Triton kernels through the interpreter and every sm_90 build, spills included. Manual: too heavy for CI.
# numpy<2.4: triton 3.6's interpreter fails on numpy 2.4 ("only 0-dimensional arrays can be converted ..."), and
# below it warns thousands of times of that coming error: the warning is silenced.
COMPAT_VENV := .venv-compat
COMPAT_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) $(shell command -v python3.12))
COMPAT_TORCH := torch==2.11.0 triton==3.6.0 torchvision==0.26.0 "numpy<2.4"
test-compat:
	@test -n "$(COMPAT_PYTHON)" || { echo "test-compat needs Python 3.12 (set COMPAT_PYTHON)"; exit 1; }
	$(MAKE) setup VENV=$(COMPAT_VENV) PYTHON3=$(COMPAT_PYTHON) TORCH='$(COMPAT_TORCH)'
	CUDA_HOME=$${CUDA_HOME:-/usr/local/cuda} $(COMPAT_VENV)/bin/python -m pytest -q -p no:cacheprovider \
		-W "ignore:Conversion of an array with ndim > 0:DeprecationWarning" \
		--benchmark-disable --durations=5 -m "not gpu" tests/test_conv_bn_act_triton.py tests/test_ffn.py \
		tests/test_conv_block.py tests/test_relu_linear_attention_triton.py tests/test_relu_linear_attention_tokens.py \
		tests/test_rms_norm.py tests/test_cascaded_group_attention_triton.py tests/test_triton_sm90.py \
		tests/test_fp32_precision.py

lint: setup
	$(PY) -m ruff check evit_kernels tests benchmarks python setup.py

# Wheels for the GPU machine, which has torch but no network (carried by the device call; see gpu_pass.sh).
gpu-wheels: setup
	$(PY) -m pip download -q -d .gpu_wheels timm efficientsam pytest-benchmark diffusers --no-deps
	# their dependencies, for the GPU machine's Python 3.12 (binary wheels included)
	$(PY) -m pip download -q -d .gpu_wheels --python-version 3.12 --platform manylinux2014_x86_64 --only-binary=:all: \
		huggingface_hub safetensors pyyaml py-cpuinfo regex importlib_metadata

gpu-pass:
	bash benchmarks/gpu_pass.sh

# Every stage of the GPU pass on this CPU (Triton interpreter, tiny shapes): run before spending device time.
gpu-pass-dry-run: setup
	CUDA_HOME=$${CUDA_HOME:-/usr/local/cuda} OUT=$${OUT:-/tmp/gpu_pass_dry_run} PYTHON=$(PY) bash benchmarks/gpu_pass.sh --dry-run

# The performance model's prediction for each released configuration (predict.RELEASED), committed for the GPU pass
# to put next to its measurements (benchmarks/released_ops.py). Slow: the interpreter counts every launch.
predictions: setup
	mkdir -p benchmarks/predictions
	$(PY) -c "from evit_kernels.predict import RELEASED; print('\n'.join(f'{m} {b} {r}' for m, b, r in RELEASED))" | \
	while read model batch res; do \
		echo "$$model batch $$batch $$res px"; \
		$(PY) -m evit_kernels predict --model $$model --batch $$batch --res $$res $$res \
			--json benchmarks/predictions/$${model}_$${batch}_$$res.json > benchmarks/predictions/$${model}_$${batch}_$$res.txt \
			|| exit 1; \
	done
