"""Ahead-of-time compilation of the kernels for a GPU target with no GPU present: the PTX / CUBIN a TensorRT
AOT plugin embeds. `python -m ssmrt.kernels.aot` compiles every kernel for sm_80, sm_87 (Jetson Orin) and
sm_90 and prints, as JSON lines, each kernel's PTX entry parameters as a plugin gets them (Triton's hidden
scratch pointers removed, see contract_ptx) and, from assembling that PTX with ptxas, registers and spills.

Run it in a process without TRITON_INTERPRET: under the interpreter Triton's own library is decorated for
interpretation and cannot be compiled.
"""

from __future__ import annotations

import json
import os
import re
import sys

TARGETS = (80, 87, 90)
LAUNCH_OPTIONS = ("num_warps", "num_stages")  # in a kernel's meta, but compile options, not constexprs


ACTIVATIONS = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def _table(act: str = "fp16"):
    """kernel -> (raw function, runtime-argument signature, constexprs of a typical specialisation), for
    activations (and the weights that follow them) of Triton type `act`; A, D, biases and states fp32. The
    plugin kernels' signatures come from their launches (ssmrt.plugins.launch: TensorRT's argument order)."""
    import importlib

    import torch

    from ..plugins.launch import KERNELS
    from . import causal_conv1d, rmsnorm, selective_chunked, selective_scan, ssd_chunked, ssd_scan

    chain = ssd_chunked.constexprs(64, 128, getattr(torch, ACTIVATIONS[act]), 256)
    sel = selective_chunked.constexprs(1536, 16)
    typical = {
        "ssd_scan": ssd_scan.constexprs(64, 128),
        "causal_conv1d": causal_conv1d.constexprs(1792, 4),
        "selective_scan": selective_scan.constexprs(1536, 16),
        **chain,
        **sel,
    }
    table = {}
    for name, k in KERNELS.items():
        raw = getattr(importlib.import_module(f"ssmrt.kernels.{k.module}"), k.raw)
        table[name] = (raw, k.signature(act), typical[name])
    f16 = f"*{act}"
    table["add_rmsnorm"] = (
        rmsnorm._add_rmsnorm_kernel,
        {"x_ptr": f16, "residual_ptr": "*fp32", "w_ptr": f16, "out_ptr": f16, "residual_out_ptr": "*fp32",
         "dim": "i32"},
        rmsnorm.add_constexprs(768, 1e-5))
    table["gated_rmsnorm"] = (
        rmsnorm._gated_rmsnorm_kernel,
        {"x_ptr": f16, "z_ptr": f16, "w_ptr": f16, "y_ptr": f16, "dim": "i32", "stride_x": "i32", "stride_z": "i32"},
        rmsnorm.gated_constexprs(1536, 1e-5))
    return table


def compile_kernel(name: str, cc: int, act: str = "fp16", meta: dict | None = None, state: str = "fp32",
                   divisible: tuple[str, ...] = ()):
    """triton.compile of one kernel for compute capability cc (e.g. 87), activation type act ("fp16", "bf16",
    "fp32") and SSM-state type `state`, with the constexprs (and launch options) `meta`, by default a typical
    specialisation; returns Triton's CompiledKernel.

    divisible: runtime parameters the kernel may assume multiples of 16 (pointers: 16-byte aligned; sizes: the
    dimensions known when the engine is built), as Triton's own launcher specialises on the values it sees. With
    a 16-aligned base and a row length that is a multiple of 16, a tile's loads become 16-byte vector loads."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    from ..plugins.launch import KERNELS

    fn, signature, typical = _table(act)[name]
    if name in KERNELS:
        signature = KERNELS[name].signature(act, state)
    meta = typical if meta is None else meta
    options = {k: meta[k] for k in LAUNCH_OPTIONS if k in meta}
    meta = {k: v for k, v in meta.items() if k not in LAUNCH_OPTIONS}
    unknown = set(divisible) - set(signature)
    if unknown:
        raise ValueError(f"{name} has no runtime parameter {sorted(unknown)[0]!r}")
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(signature) if p in divisible}
    src = triton.compiler.ASTSource(fn=JITFunction(fn), signature={**signature, **dict.fromkeys(meta, "constexpr")},
                                    constexprs=meta, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)


def ptxas_usage(ptx: str, cc: int) -> dict:
    """Assembles the PTX with the ptxas Triton uses for cc: the CUBIN's size, registers per thread and spill
    bytes (stores + loads)."""
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = f"{tmp}/kernel.ptx"
        with open(src, "w") as f:
            f.write(ptx)
        arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
        try:
            ptxas = get_ptxas(cc).path
        except TypeError:  # Triton < 3.4 picks one ptxas for every target
            ptxas = get_ptxas().path
        res = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", src, "-o", f"{tmp}/kernel.cubin"],
                             capture_output=True, text=True, check=True)
        cubin_bytes = os.path.getsize(f"{tmp}/kernel.cubin")
    log = res.stdout + res.stderr
    return {"cubin_bytes": cubin_bytes, "registers": int(re.search(r"Used (\d+) registers", log).group(1)),
            "spill_bytes": sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))}


def contract_ptx(compiled, n_params: int) -> str:
    """Triton's PTX with the entry cut down to the contract's n_params parameters.

    Triton (>= 3.3) appends hidden global / profile scratch pointers to every kernel entry, which its own
    launcher fills. A TensorRT AOT plugin passes only the contract's tensor pointers and int32 scalars, so
    the hidden ones are removed; refused (ValueError) when the kernel uses scratch memory or reads them.
    """
    md = compiled.metadata
    if getattr(md, "global_scratch_size", 0) or getattr(md, "profile_scratch_size", 0):
        raise ValueError(f"{md.name}: uses Triton scratch memory, which an AOT plugin cannot provide")
    ptx = compiled.asm["ptx"]
    start = ptx.index(".visible .entry")
    end = ptx.index(")", start)
    head, *params = [line for line in ptx[start:end].split("\n") if line.strip()]
    for line in params[n_params:]:
        name = line.strip().rstrip(",").split()[-1]
        if ptx.count(name) != 1:
            raise ValueError(f"{md.name}: the hidden parameter {name} is read by the kernel")
    kept = [line.rstrip(",") for line in params[:n_params]]
    return ptx[:start] + head + "\n" + ",\n".join(kept) + "\n" + ptx[end:]


def ptx_params(ptx: str) -> list[str]:
    """The PTX types of the kernel entry's parameters, in order (u64 = pointer, u32 = int32)."""
    start = ptx.index(".visible .entry")
    return re.findall(r"\.param \.(u64|u32|u16|u8|f32|f64|b32|b64|s32)", ptx[start : ptx.index(")", start)])


# The dimensions of the typical specialisations above (a Mamba-2 layer of 24 heads of 64, dstate 128; a Mamba-1
# layer of 1536 channels): the plugin kernels are compiled as a TensorRT engine builds them, aligned and with
# the model's dimensions that are multiples of 16 known as such.
TYPICAL_SIZES = {"headdim": 64, "dstate": 128, "dim": 1536, "nheads": 24, "ngroups": 1, "width": 4}


def main() -> int:
    from ..plugins.launch import KERNELS

    for name, (_, signature, _) in _table().items():
        divisible = ()
        if name in KERNELS:
            k = KERNELS[name]
            divisible = k.divisible({n: TYPICAL_SIZES.get(n, 1) for n in k.scalars})
        for cc in TARGETS:
            k = compile_kernel(name, cc, divisible=divisible)
            ptx = contract_ptx(k, len(signature))
            print(json.dumps({
                "kernel": name, "sm": cc, "params": ptx_params(ptx),
                "signature": ["u64" if t.startswith("*") else "u32" for t in signature.values()],
                "triton_params": ptx_params(k.asm["ptx"]),
                "pointers": sum(t.startswith("*") for t in signature.values()),
                "int32": sum(t == "i32" for t in signature.values()), **ptxas_usage(ptx, cc),
                "ptx_target": f".target sm_{cc}" in ptx, "divisible": list(divisible),
            }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
