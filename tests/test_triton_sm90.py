"""Every Triton kernel configuration the dispatcher can pick, and every exact specialization the released models
launch, compiles for the H100 (sm_90) without a GPU, within its shared memory and without register spills (run in
subprocesses: the interpreter that the other tests use replaces @triton.jit)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from evit_kernels import predict
from evit_kernels.ops.cascaded_group_attention import H100_SHARED_MEMORY_PER_BLOCK

pytestmark = pytest.mark.slow

MODULES = ["evit_kernels.triton.relu_linear_attention", "evit_kernels.triton.conv_bn_act",
           "evit_kernels.triton.cascaded_group_attention", "evit_kernels.triton.ffn",
           "evit_kernels.triton.conv_block", "evit_kernels.triton.rms_norm", "evit_kernels.triton.split_sum"]

_SCRIPT = textwrap.dedent("""
    import importlib, json, sys
    from evit_kernels import predict
    module = importlib.import_module(sys.argv[1])
    results = []
    for kernel, signature, constexprs, *options in module.compile_configs():
        options = options[0] if options else {}
        facts = predict.build_facts(kernel, signature, constexprs, options, sys.argv[2])
        results.append({"kernel": kernel.__name__, "config": {k: str(v) for k, v in constexprs.items()},
                        "dtype": signature[kernel.arg_names[0]], **options, "shared": facts.shared_bytes,
                        "spill_bytes": facts.spill_bytes})
    print(json.dumps(results))
""")

# The exact specializations the released models launch (evit_kernels.predict), each built once, and listed for every
# model that launches it (two models may launch the same builds: Sana 600M and 1600M do).
_RELEASED_SCRIPT = textwrap.dedent("""
    import json, sys
    from evit_kernels import predict
    facts, built = [], {}
    for name, batch, res in predict.RELEASED:
        for launch in predict.model_launches(name, batch, res):
            key = predict.specialization_key(launch)
            if key not in built:
                built[key] = predict.compile_facts(launch, sys.argv[1]).__dict__
            fact = {"model": name, "batch": batch, "kernel": launch.kernel, **built[key]}
            if fact not in facts:
                facts.append(fact)
    print(json.dumps(facts))
""")


PTXAS = shutil.which("ptxas") or next(
    (p for p in (os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "ptxas"),) if os.path.exists(p)),
    None)


@pytest.fixture(scope="module")
def compiles():
    """One compiling subprocess per kernel module, all started at once (the compiles are independent and
    CPU-bound: they share the cores instead of running one after another)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    started = {m: subprocess.Popen([sys.executable, "-c", _SCRIPT, m, PTXAS], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=env) for m in MODULES}
    started["released"] = subprocess.Popen([sys.executable, "-c", _RELEASED_SCRIPT, PTXAS], stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True, env=env)
    return {m: (p, *p.communicate(timeout=900)) for m, p in started.items()}


@pytest.mark.skipif(PTXAS is None, reason="needs ptxas from a CUDA toolkit")
@pytest.mark.parametrize("module", MODULES)
def test_kernels_compile_for_sm90(module, compiles):
    run, stdout, stderr = compiles[module]
    assert run.returncode == 0, stderr[-3000:]
    results = json.loads(stdout.splitlines()[-1])
    assert results
    for r in results:
        assert r["shared"] <= H100_SHARED_MEMORY_PER_BLOCK, r
        assert r["spill_bytes"] == 0, r


@pytest.mark.skipif(PTXAS is None, reason="needs ptxas from a CUDA toolkit")
def test_released_models_launches_compile_for_sm90_without_spills(compiles):
    """The builds the released models really get: the JIT specializes integer arguments equal to 1 and multiples of
    16, so these are not the configurations above (an fp32 variant once spilled only as it really runs)."""
    run, stdout, stderr = compiles["released"]
    assert run.returncode == 0, stderr[-3000:]
    facts = json.loads(stdout.splitlines()[-1])
    assert {f["model"] for f in facts} == {name for name, _, _ in predict.RELEASED}
    assert {f["kernel"] for f in facts} >= {"_conv_project_fwd_kernel", "_conv_dense_kernel", "_ffn_fwd_kernel",
                                            "_rla_fwd_apply_kernel", "_rla_fwd_one_pass_kernel",
                                            "_rla_agg_fwd_one_pass_kernel", "_cga_map_fwd_kernel",
                                            "_cga_head_fwd_kernel", "_conv_dw_planes_kernel"}
    for f in facts:
        assert f["shared_bytes"] <= H100_SHARED_MEMORY_PER_BLOCK, f
        assert f["spill_bytes"] == 0, f
