"""The attention kernels' GPU tile plans compile for the H100 (sm_90) within its shared memory, no GPU needed.

Triton compiles ahead of time for a named target, so this runs on the CPU machines CI uses. It guards the
failure the GPU conformance run hit: fp32 inputs ("ieee" dots, no wgmma form) on the bf16 plans' 128 x 64
tiles asked for 295 KB of shared memory at d256 (measured with this test's compile), past the H100's
227 KB, and took ~1 minute to compile a forward kernel on this machine's CPU. The widest head dim is the
worst case of each plan.

The compile runs in a child process with TRITON_INTERPRET=0: under the interpreter (on in this test
session without a GPU) `@triton.jit` functions are interpreter objects that cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.tools.tensor_descriptor import TensorDescriptor

from optimized.kernels import attention
from optimized.kernels.attention import launchers, lowering
from reference.ops.attention import AttentionSpec

H100 = GPUTarget("cuda", 90, 128)
H100_SHARED_MEMORY = 227 * 1024  # bytes a block may use on sm_90 (cudaDevAttrMaxSharedMemoryPerBlockOptin)
POINTER_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.int32: "*i32",
                 torch.int64: "*i64", torch.bool: "*i1", torch.uint8: "*u8"}


def _signature(kernel, args, kwargs) -> tuple[dict, dict]:
    """Triton's (signature, constexprs) for one call, typed as its launcher would type them."""
    values = dict(zip(kernel.arg_names, args)) | kwargs
    signature, constants = {}, {}
    for param in kernel.params:
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name], constants[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = POINTER_TYPES[value.dtype]
        elif isinstance(value, TensorDescriptor):
            element = POINTER_TYPES[value.base.dtype].lstrip("*")
            signature[param.name] = f"tensordesc<{element}[{','.join(map(str, value.block_shape))}]>"
        else:
            signature[param.name] = {bool: "i1", int: "i32", float: "fp32"}[type(value)]
    return signature, constants


def _calls(dtype: torch.dtype, head_dim: int) -> dict:
    """The three kernels' launches for a causal call in `dtype` at `head_dim`, on the GPU plan, not run
    (the dense kernels where the call's route says so)."""
    calls = {}
    launchers._launch_bound = lambda kernel, grid, *a, **kw: calls.setdefault(kernel, (a, kw))  # a child process
    q = torch.randn(1, 2, 64, head_dim, dtype=dtype)
    spec = AttentionSpec(causal=True)
    route = attention.route(q, q, q, spec)
    plan = attention.default_plan(head_dim, torch.device("cuda"), spec, 64, dtype, route.forward_dense)
    low = lowering._lower(spec, 1, 64, q.device)
    lse = torch.zeros(1, 2, 64)
    launchers._launch_forward(q, q, q, spec, low, plan.fwd, route)
    route = route.for_backward(q, q)
    launchers._launch_dq(q, q, q, q, q, lse, spec, low, plan.dq, route)
    launchers._launch_dkdv(q, q, q, q, lse, lse, spec, low, plan.dkdv, route)
    return calls


def shared_memory_per_kernel(dtype: torch.dtype, head_dim: int) -> dict:
    """{kernel name: shared memory bytes} of the three kernels compiled for the H100 (needs the compiler,
    not the interpreter)."""
    found = {}
    for kernel, (args, kwargs) in _calls(dtype, head_dim).items():
        signature, constants = _signature(kernel, args, kwargs)
        options = {"num_warps": kwargs["num_warps"], "num_stages": kwargs["num_stages"]}
        compiled = triton.compile(ASTSource(kernel, signature, constexprs=constants), target=H100, options=options)
        found[kernel.__name__] = compiled.metadata.shared
    return found


def _compiled_in_child(dtype: str, head_dim: int) -> dict:
    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    env = os.environ | {"TRITON_INTERPRET": "0", "PYTHONPATH": path}
    child = subprocess.run([sys.executable, __file__, dtype, str(head_dim)], env=env, capture_output=True,
                           text=True, timeout=900, check=False)
    assert child.returncode == 0, child.stderr[-3000:]
    return json.loads(child.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype, head_dim", [("float32", 256), ("bfloat16", 256), ("bfloat16", 128), ("bfloat16", 64)])
def test_every_kernel_fits_the_h100_shared_memory(dtype, head_dim):
    """d256 is the general kernels' widest head dim, d128 and d64 the dense kernels' two plans."""
    shared = _compiled_in_child(dtype, head_dim)
    kinds = "_dense" if dtype == "bfloat16" and head_dim in (64, 128) else ""
    expected = {f"_attn_fwd{kinds}_kernel", f"_attn_bwd_dq{kinds}_kernel", f"_attn_bwd_dkdv{kinds}_kernel"}
    assert set(shared) == expected, shared
    too_big = {name: size for name, size in shared.items() if size > H100_SHARED_MEMORY}
    assert not too_big, f"{dtype} at d{head_dim} needs more than the H100's {H100_SHARED_MEMORY} B: {too_big}"


if __name__ == "__main__":
    print(json.dumps(shared_memory_per_kernel(getattr(torch, sys.argv[1]), int(sys.argv[2]))))
