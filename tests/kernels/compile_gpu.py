"""Compile the GPU-only code path of the Triton kernels for sm_90, with no GPU needed.

The interpreter runs every dot in fp32, so the fp16/bf16 tensor-core path (and register
pressure) is only seen by the real compiler. Run as ``python -m tests.kernels.compile_gpu``
with ``TRITON_INTERPRET`` unset; prints one line per kernel with its registers and spill
stack, and exits 1 if any kernel fails to compile.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kvgate.kernels import triton_attention as ta
from kvgate.kernels import triton_store as ts

TARGET = GPUTarget("cuda", 90, 32)


def compile_kernel(fn, types: dict[str, str], consts: dict, num_warps: int) -> str:
    signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts),
                            target=TARGET, options={"num_warps": num_warps, "num_stages": 1})
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    return next((line.strip().split(" SHARED")[0] for line in usage.splitlines() if "REG:" in line), "")


def main() -> int:
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "unset TRITON_INTERPRET"
    dtype, head_dim, group = "bf16", 128, 4
    p = f"*{dtype}"
    kv = {"k_ptr": p, "v_ptr": p, "table_ptr": "*i32", "lens_ptr": "*i32", "scale_log2": "fp32"}
    precision = {"UPCAST": False, "PRECISION": "tf32x3"}
    block_n = ta._block_n(head_dim)
    plain = {"QUANT": False}
    jobs = [
        (ta._decode_kernel, {**kv, "q_ptr": p, "out_ptr": p, "part_acc_ptr": "*fp32",
                             "part_ml_ptr": "*fp32"},
         dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=16, NUM_SPLITS=8, BLOCK_G=16,
              BLOCK_N=block_n, BLOCK_D=head_dim, **plain, **precision), 4),
        (ta._decode_reduce_kernel, {"part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32", "out_ptr": p},
         dict(NUM_HEADS=32, HEAD_DIM=head_dim, NUM_SPLITS=8, BLOCK_S=8, BLOCK_D=head_dim), 4),
        (ta._prefill_kernel, {**kv, "q_ptr": p, "out_ptr": p, "cu_ptr": "*i32"},
         dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=16, TOKENS=64 // group, BLOCK_M=64,
              BLOCK_N=block_n, BLOCK_D=head_dim, **plain, **precision), 8),
        (ts._store_kv_kernel, {"k_ptr": p, "v_ptr": p, "k_cache_ptr": p, "v_cache_ptr": p,
                               "slot_ptr": "*i64"},
         dict(NUM_HEADS=8, HEAD_DIM=head_dim, BLOCK_SIZE=16, BLOCK_H=8, BLOCK_D=head_dim), 4),
    ]
    # quantized pages (fp8 e4m3 and int8 values, fp32 scales): the same kernels with QUANT
    for q, qmax in (("*fp8e4nv", 448.0), ("*i8", 127.0)):
        scales = {"k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32"}
        qkv = {**kv, "k_ptr": q, "v_ptr": q, **scales}
        jobs += [
            (ta._decode_kernel, {**qkv, "q_ptr": p, "out_ptr": p, "part_acc_ptr": "*fp32",
                                 "part_ml_ptr": "*fp32"},
             dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=16, NUM_SPLITS=8, BLOCK_G=16,
                  BLOCK_N=block_n, BLOCK_D=head_dim, QUANT=True, **precision), 4),
            (ta._prefill_kernel, {**qkv, "q_ptr": p, "out_ptr": p, "cu_ptr": "*i32"},
             dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=16, TOKENS=64 // group,
                  BLOCK_M=64, BLOCK_N=block_n, BLOCK_D=head_dim, QUANT=True, **precision), 8),
            (ts._store_quantized_kernel, {"k_ptr": p, "v_ptr": p, "k_cache_ptr": q,
                                          "v_cache_ptr": q, **scales, "slot_ptr": "*i64"},
             dict(HEAD_DIM=head_dim, BLOCK_SIZE=16, BLOCK_O=16, BLOCK_D=head_dim, CHUNK=128,
                  QMAX=qmax, IS_FP8=q == "*fp8e4nv"), 4),
        ]
    for fn, types, consts, warps in jobs:
        quant = "" if not consts.get("QUANT", "QMAX" in consts) else \
            f" {types.get('k_ptr') if 'QUANT' in consts else types['k_cache_ptr']} pages"
        print(f"{fn.__name__} {dtype}{quant} d={head_dim}: "
              f"{compile_kernel(fn, types, consts, warps)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
