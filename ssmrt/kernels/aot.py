"""Ahead-of-time compilation of the kernels for a GPU target with no GPU present: the PTX / CUBIN a TensorRT
AOT plugin embeds. `python -m ssmrt.kernels.aot` compiles every kernel for sm_80, sm_87 (Jetson Orin) and
sm_90 and prints each PTX entry's parameter list as JSON lines.

Run it in a process without TRITON_INTERPRET: under the interpreter Triton's own library is decorated for
interpretation and cannot be compiled.
"""

from __future__ import annotations

import json
import re
import sys

TARGETS = (80, 87, 90)


def _table():
    """kernel -> (raw function, runtime-argument signature, constexprs of a typical specialisation)."""
    from . import causal_conv1d, selective_scan, ssd_scan

    f16, f32 = "*fp16", "*fp32"
    return {
        "ssd_scan": (
            ssd_scan._ssd_scan_kernel,
            {"x_ptr": f16, "dt_ptr": f16, "A_ptr": f32, "B_ptr": f16, "C_ptr": f16, "D_ptr": f32,
             "dt_bias_ptr": f32, "state_ptr": f32, "y_ptr": f16, "state_out_ptr": f32,
             "seqlen": "i32", "nheads": "i32", "headdim": "i32", "dstate": "i32", "ngroups": "i32"},
            ssd_scan.constexprs(64, 128)),
        "causal_conv1d": (
            causal_conv1d._causal_conv1d_kernel,
            {"x_ptr": f16, "w_ptr": f16, "bias_ptr": f16, "state_ptr": f16, "y_ptr": f16, "state_out_ptr": f16,
             "seqlen": "i32", "dim": "i32", "width": "i32"},
            causal_conv1d.constexprs(1792, 4)),
        "selective_scan": (
            selective_scan._selective_scan_kernel,
            {"u_ptr": f16, "delta_ptr": f16, "A_ptr": f32, "B_ptr": f16, "C_ptr": f16, "D_ptr": f32, "z_ptr": f16,
             "delta_bias_ptr": f32, "state_ptr": f32, "y_ptr": f16, "state_out_ptr": f32,
             "seqlen": "i32", "dim": "i32", "dstate": "i32", "ngroups": "i32"},
            selective_scan.constexprs(1536, 16)),
    }


def compile_kernel(name: str, cc: int):
    """triton.compile of one kernel for compute capability cc (e.g. 87); returns Triton's CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    fn, signature, meta = _table()[name]
    src = triton.compiler.ASTSource(fn=JITFunction(fn), signature={**signature, **dict.fromkeys(meta, "constexpr")},
                                    constexprs=meta)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32))


def ptx_params(ptx: str) -> list[str]:
    """The PTX types of the kernel entry's parameters, in order (u64 = pointer, u32 = int32)."""
    start = ptx.index(".visible .entry")
    return re.findall(r"\.param \.(u64|u32|u16|u8|f32|f64|b32|b64|s32)", ptx[start : ptx.index(")", start)])


def main() -> int:
    for name, (_, signature, _) in _table().items():
        for cc in TARGETS:
            k = compile_kernel(name, cc)
            print(json.dumps({
                "kernel": name, "sm": cc, "params": ptx_params(k.asm["ptx"]),
                "pointers": sum(t.startswith("*") for t in signature.values()),
                "int32": sum(t == "i32" for t in signature.values()),
                "cubin_bytes": len(k.asm["cubin"]), "ptx_target": f".target sm_{cc}" in k.asm["ptx"],
            }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
