"""Compile the fused-MoE kernels for an H100 (sm_90) without a GPU: ``python -m kernels.moe_aot_check``.

Triton ships ptxas and cuobjdump, so a CPU-only machine can build the cubins and read their resource usage:
shared memory (an H100 block may use 227 KB), registers and local-memory spills (``STACK``; a spilling GEMM
streams its weights slowly). Arguments are typed and marked 16-divisible the way Triton specializes them at
run time for the real shapes (hidden 7168, inter 2048: every stride a multiple of 16). Exits 1 on a failure.
Run it without ``TRITON_INTERPRET`` (the interpreter's kernels cannot be compiled).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.fused_moe import MoEConfig, default_config
from kernels.moe_align import _moe_align_kernel
from kernels.moe_bench import sweep_configs
from kernels.moe_kernels import _down_kernel, _gate_up_kernel, _sum_slots_kernel

H100 = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 227 * 1024
_PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}


def compile_one(fn, types: dict, constexprs: dict, divisible: list[str], num_warps: int, num_stages: int):
    signature = {name: "constexpr" if name in constexprs else types[name] for name in fn.arg_names}
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    src = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=H100, options=dict(num_warps=num_warps, num_stages=num_stages))


def resource_usage(kernel) -> dict:
    """REG / STACK / SHARED from cuobjdump on the cubin (STACK > 0: registers spilled to local memory)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return {k: int(v) for k, v in re.findall(r"(REG|STACK):(\d+)", text)}


def kernels_of(cfg: MoEConfig, dtype: torch.dtype, top_k: int, num_experts: int):
    """(name, fn, types, constexprs, divisible, warps, stages) of the four launches of one fused_moe call."""
    p, prec = _PTR[dtype], "ieee" if dtype == torch.float32 else "tf32"
    gemm = dict(BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, PRECISION=prec, UPCAST=False)
    e_pow2 = triton.next_power_of_2(num_experts)
    yield ("gate_up", _gate_up_kernel,
           dict(X=p, W13=p, H=p, SORTED_IDS="*i32", BLOCK_EXPERT="*i32", num_pairs="i32", inter="i32", hidden="i32",
                stride_xt="i32", stride_we="i32", stride_wn="i32", stride_ht="i32"),
           dict(TOP_K=top_k, BLOCK_N=cfg.block_n_gate_up, **gemm),
           ["X", "W13", "H", "SORTED_IDS", "BLOCK_EXPERT", "inter", "hidden", "stride_xt", "stride_we", "stride_wn",
            "stride_ht"], cfg.num_warps, cfg.num_stages)
    yield ("down", _down_kernel,
           dict(H=p, W2=p, Y="*fp32", TOPK_W="*fp32", SORTED_IDS="*i32", BLOCK_EXPERT="*i32", num_pairs="i32",
                hidden="i32", inter="i32", stride_ht="i32", stride_we="i32", stride_wn="i32", stride_yt="i32"),
           dict(BLOCK_N=cfg.block_n_down, **gemm),
           ["H", "W2", "Y", "TOPK_W", "SORTED_IDS", "BLOCK_EXPERT", "hidden", "inter", "stride_ht", "stride_we",
            "stride_wn", "stride_yt"], cfg.num_warps, cfg.num_stages)
    yield ("sum_slots", _sum_slots_kernel,
           dict(Y="*fp32", OUT=p, TOPK_IDS="*i64", num_experts="i32", hidden="i32", stride_yt="i32", stride_ot="i32"),
           dict(TOP_K=top_k, BLOCK_N=cfg.block_n_down), ["Y", "OUT", "TOPK_IDS", "hidden", "stride_yt", "stride_ot"],
           4, 3)
    yield ("align", _moe_align_kernel,
           dict(IDS="*i64", SORTED_IDS="*i32", BLOCK_EXPERT="*i32", num_pairs="i32", num_experts="i32",
                max_rows="i32"),
           dict(BLOCK_M=cfg.block_m, E_POW2=e_pow2, CHUNK=max(16, min(1024, 8192 // e_pow2))),
           ["IDS", "SORTED_IDS", "BLOCK_EXPERT", "max_rows"], 8, 3)


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    hidden, inter, k, failures, seen = 7168, 2048, 8, 0, set()
    cases = []
    for E in (256, 384):
        for T in (1, 64, 1024, 4096):
            for dtype in (torch.bfloat16, torch.float32):
                cfgs = [default_config(T * k, E, hidden, inter, dtype)]
                if dtype == torch.bfloat16 and T == 1:
                    cfgs = sweep_configs(cfgs[0])
                cases += [(cfg, dtype, E) for cfg in cfgs]
    print(f"triton {triton.__version__}, target sm_90, shared-memory limit {SMEM_LIMIT // 1024} KB")
    for cfg, dtype, E in cases:
        for name, fn, types, consts, div, warps, stages in kernels_of(cfg, dtype, k, E):
            key = (name, str(dtype), tuple(sorted(consts.items())), warps, stages)
            if key in seen:
                continue
            seen.add(key)
            tag = f"{name:<9} {str(dtype)[6:]:<8} {consts} warps {warps} stages {stages}"
            try:
                kernel = compile_one(fn, types, consts, div, warps, stages)
            except Exception as exc:  # noqa: BLE001 - report every failing config
                failures += 1
                print(f"FAIL {tag}: {type(exc).__name__}: {str(exc)[:300]}")
                continue
            use, smem = resource_usage(kernel), kernel.metadata.shared
            ok = smem <= SMEM_LIMIT and use.get("STACK", 0) == 0
            failures += not ok
            print(f"{'ok  ' if ok else 'BAD '} {tag}: shared {smem / 1024:.0f} KB, regs {use.get('REG')}, "
                  f"spill stack {use.get('STACK')} B")
    print(f"{failures} failing configs")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
