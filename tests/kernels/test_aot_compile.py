"""Every Triton kernel compiles ahead of time for sm80 and sm90 on this CPU-only machine.

The interpreter does not enforce GPU rules (tl.dot's K >= 16, shared-memory limits, dtype
lowering); compiling to PTX and cubin for the real targets does. Compilation runs in a child
process without TRITON_INTERPRET, which would otherwise turn Triton's own helpers into
interpreted functions.
"""

import json
import os
import subprocess
import sys

import pytest
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from attnzoo.kernels.triton import grouped, linear, masked

FLOAT_ARGS = {"qk_scale", "scale", "c", "denom_min"}
STAT_PTRS = {"LSE", "DELTA", "S", "Z", "VS", "DS", "DZ", "DX", "DTAU"}
INDEX_PTRS = {"QG", "KG", "R", "IDX", "PTR", "M"}
DATA_PTRS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "TAU"}

KERNELS = {
    "grouped_fwd": (grouped._grouped_fwd_kernel, dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=32)),
    "grouped_bwd_dq": (grouped._grouped_bwd_dq_kernel, dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=32)),
    "grouped_bwd_dkdv": (grouped._grouped_bwd_dkdv_kernel, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=64, PER_SLOT=False)),
    "grouped_bwd_dkdv_per_slot": (
        grouped._grouped_bwd_dkdv_kernel,
        dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=64, PER_SLOT=True),  # overlapping key groups
    ),
    "masked_fwd": (masked._masked_fwd_kernel, "masked"),
    "masked_bwd_dq": (masked._masked_bwd_dq_kernel, "masked"),
    "masked_bwd_dkdv": (masked._masked_bwd_dkdv_kernel, "masked"),
    "linear_state": (linear._state_kernel, dict(MODE=0, BLOCK_N=64, BLOCK_D=32)),
    "linear_apply": (linear._apply_kernel, dict(MODE=1, BLOCK_M=64, BLOCK_D=32)),
    "linear_bwd_query": (linear._bwd_query_kernel, dict(MODE=0, BLOCK_M=64, BLOCK_D=32)),
    "linear_bwd_key": (linear._bwd_key_kernel, dict(MODE=1, BLOCK_M=64, BLOCK_D=32)),
}


def as_jit(kernel):
    """Under TRITON_INTERPRET=1 the kernels are interpreted functions: recover the JIT form."""
    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


def compile_kernel(name, dtype, arch):
    kernel, blocks = KERNELS[name]
    if blocks == "masked":  # the tiles the launcher picks for head dim 64 in this dtype
        blocks = dict(
            zip(("BLOCK_M", "BLOCK_N", "BLOCK_D"), masked._tiles(64, 2 if dtype == "fp16" else 4), strict=True)
        )
    fn = as_jit(kernel)
    constexprs = {**blocks, "ACC": tl.float32}
    signature = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in FLOAT_ARGS:
            signature[arg] = "fp32"
        elif arg in INDEX_PTRS:
            signature[arg] = "*i32"
        elif arg in STAT_PTRS:
            signature[arg] = "*fp32"
        elif arg in DATA_PTRS:
            signature[arg] = f"*{dtype}"
        else:
            signature[arg] = "i32"
    source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32))
    return {"cubin_bytes": len(compiled.asm["cubin"]), "shared": compiled.metadata.shared}


def compile_all():
    results = {}
    for name in KERNELS:
        for dtype in DTYPES:
            for arch in ARCHS:
                try:
                    results[f"{name}/{dtype}/{arch}"] = compile_kernel(name, dtype, arch)
                except Exception as err:  # reported per kernel by the test below
                    results[f"{name}/{dtype}/{arch}"] = {"error": f"{type(err).__name__}: {err}"[:2000]}
    print(json.dumps(results))


DTYPES, ARCHS = ("fp16", "fp32"), (80, 90)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))  # really compile, leave no cache behind
    code = "from tests.kernels.test_aot_compile import compile_all; compile_all()"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(KERNELS))
def test_kernel_compiles_for_gpu(compiled, name, dtype, arch):
    result = compiled[f"{name}/{dtype}/{arch}"]
    assert "error" not in result, result.get("error")
    assert result["cubin_bytes"] > 0 and result["shared"] <= 227 * 1024
