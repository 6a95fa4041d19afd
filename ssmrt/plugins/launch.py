"""How each ssmrt kernel is launched, in the form a TensorRT AOT plugin launches it, with no TensorRT here.

TensorRT's AOT plugin runtime calls one compiled kernel with its input pointers, then int32 scalars, then its
output pointers, on a grid and block it computed from the plugin's launch parameters. Every kernel of an ssmrt
op (the one-launch kernels and the chained prefill kernels) takes its arguments in exactly that order; the two
fused norms of the torch backend are no plugin's and launch directly. This table says, per kernel, which tensors
go where,
which int32 scalars follow (each one an input's dimension, so TensorRT can pass it as a symbolic expression of
the input shapes) and how the grid follows from those dimensions and the kernel's compile-time constants.

The Triton wrappers launch through `launch()`, and the AOT compile table and the plugins read the same
entries: one source of truth for what a launch is. A kernel here knows nothing of TensorRT, and this module
imports neither TensorRT nor Triton nor torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from ..ops.spec import ALL_OPS, CHAIN_OPS

# The sizes that change from call to call (a plugin sees them as run-time values); the others are the model's.
PER_CALL = frozenset({"batch", "seqlen", "nchunks"})


def cdiv(a, b):
    """Ceiling division for ints and for symbolic sizes that support + and //. A grid keeps a symbolic size on
    the left of every operator (TensorRT's size expressions define `expr * 2`, not `2 * expr`)."""
    return (a + b - 1) // b


@dataclass(frozen=True)
class Pointer:
    """A tensor argument: the kernel's parameter is `{name}_ptr`; dtype "act" (the activations' type), "fp32",
    or "state" (the SSM state's type, float32 unless the model keeps a low-precision state)."""

    name: str
    dtype: str


@dataclass(frozen=True)
class Kernel:
    """One kernel's launch.

    module / jit: where the decorated kernel lives (ssmrt.kernels.<module>.<jit>), raw: its undecorated function
    (what triton.compile takes for AOT). inputs / outputs: pointers in launch order; scalars: the int32
    arguments between them; sizes: every named size the scalars and the grid use, as (tensor, axis).
    grid(sizes, constexprs) -> the launch grid (1 to 3 axes).
    """

    name: str
    module: str
    jit: str
    raw: str
    inputs: tuple[Pointer, ...]
    scalars: tuple[str, ...]
    outputs: tuple[Pointer, ...]
    sizes: Mapping[str, tuple[str, int]]
    grid: Callable[[Mapping, Mapping], tuple]

    @property
    def pointers(self) -> tuple[Pointer, ...]:
        return (*self.inputs, *self.outputs)

    @property
    def parameters(self) -> list[str]:
        """The kernel's runtime parameters in order (what its PTX entry takes)."""
        return [f"{p.name}_ptr" for p in self.inputs] + list(self.scalars) + [f"{p.name}_ptr" for p in self.outputs]

    def resolve(self, shapes: Mapping[str, tuple]) -> dict:
        """The named sizes for tensors of the given shapes (tensor name -> shape)."""
        return {name: shapes[tensor][axis] for name, (tensor, axis) in self.sizes.items()}

    def divisible(self, sizes: Mapping, aligned: bool = True, static: Callable[[str], bool] = lambda n: True
                  ) -> tuple[str, ...]:
        """The runtime parameters a compile may assume multiples of 16 (ssmrt.kernels.aot.compile_kernel): every
        pointer where `aligned` (16-byte aligned buffers), and each int32 size that is a model dimension (not the
        batch, sequence or chunk count, which change from call to call), known (`static`) and a multiple of 16."""
        ptrs = [f"{p.name}_ptr" for p in self.pointers] if aligned else []
        return (*ptrs, *(n for n in self.scalars if n not in PER_CALL and static(n) and int(sizes[n]) % 16 == 0))

    def signature(self, act: str, state: str = "fp32") -> dict[str, str]:
        """The runtime-argument signature triton.compile takes, for Triton types act / state ("fp16", ...)."""
        types = {"act": f"*{act}", "fp32": "*fp32", "state": f"*{state}"}
        sig = {f"{p.name}_ptr": types[p.dtype] for p in self.inputs}
        sig |= dict.fromkeys(self.scalars, "i32")
        return sig | {f"{p.name}_ptr": types[p.dtype] for p in self.outputs}


def _op_pointers(op: str, names: dict[str, str], state: tuple[str, ...]) -> tuple[tuple[Pointer, ...], ...]:
    """Input and output pointers of an op's one-launch kernel, from the op's contract: the kernel parameter
    name for each spec tensor (names), fp32 where the spec keeps it fp32, the state's own type for `state`."""
    spec = ALL_OPS[op]

    def ptr(t):
        return Pointer(names.get(t.name, t.name), "state" if t.name in state else ("fp32" if t.fp32 else "act"))

    return tuple(ptr(t) for t in spec.inputs), tuple(ptr(t) for t in spec.outputs)


def _k(name, module, inputs, scalars, outputs, sizes, grid, jit=None, raw=None):
    return Kernel(name, module, jit or f"{name}_kernel", raw or f"_{name}_kernel", tuple(inputs), tuple(scalars),
                  tuple(outputs), sizes, grid)


def P(name: str, dtype: str = "act") -> Pointer:  # noqa: N802
    return Pointer(name, dtype)


_conv_in, _conv_out = _op_pointers("CausalConv1d", {"weight": "w", "conv_state": "state",
                                                    "present_conv_state": "state_out"}, ())
_sel_in, _sel_out = _op_pointers("SelectiveScan", {"ssm_state": "state", "present_ssm_state": "state_out"},
                                 ("ssm_state", "present_ssm_state"))
_ssd_in, _ssd_out = _op_pointers("SSDScan", {"ssm_state": "state", "present_ssm_state": "state_out"},
                                 ("ssm_state", "present_ssm_state"))

# The chain kernels' parameters are their nodes' tensor names, but for the SSM state (as the one-node ops')
_STATE = {"ssm_state": "state", "present_ssm_state": "state_out"}
_io = {op: _op_pointers(op, _STATE, tuple(_STATE)) for op in CHAIN_OPS}

SSD_SIZES = {"batch": ("x", 0), "seqlen": ("x", 1), "nheads": ("x", 2), "headdim": ("x", 3), "dstate": ("B", 3),
             "ngroups": ("B", 2)}
SEL_SIZES = {"batch": ("u", 0), "seqlen": ("u", 1), "dim": ("u", 2), "dstate": ("B", 3), "ngroups": ("B", 2)}


def _nchunks(s, m):
    return cdiv(s["seqlen"], m["CHUNK"])


KERNELS: dict[str, Kernel] = {k.name: k for k in (
    _k("causal_conv1d", "causal_conv1d", _conv_in, ("seqlen", "dim", "width"), _conv_out,
       {"batch": ("x", 0), "seqlen": ("x", 1), "dim": ("x", 2), "width": ("w", 1)},
       lambda s, m: (cdiv(s["dim"], m["BLOCK_C"]), cdiv(s["seqlen"], m["BLOCK_T"]), s["batch"])),
    _k("selective_scan", "selective_scan", _sel_in, ("seqlen", "dim", "dstate", "ngroups"), _sel_out, SEL_SIZES,
       lambda s, m: (cdiv(s["dim"], m["BLOCK_D"]), s["batch"])),
    _k("ssd_scan", "ssd_scan", _ssd_in, ("seqlen", "nheads", "headdim", "dstate", "ngroups"), _ssd_out, SSD_SIZES,
       lambda s, m: (cdiv(s["headdim"], m["BLOCK_P"]), s["batch"] * s["nheads"])),
    # The SSD chain (ssd_chunked.py): the intermediates are tensors between the kernels, all fp32.
    _k("ssd_chunk_state", "ssd_chunked", _io["SSDChunkState"][0],
       ("seqlen", "nheads", "headdim", "dstate", "ngroups"),
       _io["SSDChunkState"][1], SSD_SIZES,
       lambda s, m: (cdiv(s["headdim"], m["BLOCK_P"]) * cdiv(s["dstate"], m["BLOCK_N"]),
                     s["batch"] * _nchunks(s, m) * s["nheads"])),
    _k("ssd_state_passing", "ssd_chunked", _io["SSDStatePassing"][0], ("nchunks", "nheads", "headdim", "dstate"),
       _io["SSDStatePassing"][1],
       {"batch": ("state", 0), "nheads": ("state", 1), "headdim": ("state", 2), "dstate": ("state", 3),
        "nchunks": ("chunk_states", 1)},
       lambda s, m: (cdiv(s["headdim"] * s["dstate"], m["BLOCK_S"]), s["batch"] * s["nheads"])),
    _k("ssd_chunk_scan", "ssd_chunked", _io["SSDChunkScan"][0], ("seqlen", "nheads", "headdim", "dstate", "ngroups"),
       _io["SSDChunkScan"][1], SSD_SIZES,
       lambda s, m: (cdiv(s["headdim"], m["BLOCK_P"]) * cdiv(m["CHUNK"], m["BLOCK_M"]),
                     s["batch"] * _nchunks(s, m) * s["nheads"])),
    # The selective-scan chain (selective_chunked.py).
    _k("selective_chunk_state", "selective_chunked", _io["SelectiveChunkState"][0],
       ("seqlen", "dim", "dstate", "ngroups"),
       _io["SelectiveChunkState"][1], SEL_SIZES,
       lambda s, m: (cdiv(s["dim"], m["BLOCK_D"]), _nchunks(s, m), s["batch"])),
    _k("selective_state_passing", "selective_chunked", _io["SelectiveStatePassing"][0], ("nchunks", "dim", "dstate"),
       _io["SelectiveStatePassing"][1],
       {"batch": ("state", 0), "dim": ("state", 1), "dstate": ("state", 2), "nchunks": ("chunk_states", 1)},
       lambda s, m: (cdiv(s["dim"] * s["dstate"], m["BLOCK_S"]), s["batch"])),
    _k("selective_chunk_scan", "selective_chunked", _io["SelectiveChunkScan"][0],
       ("seqlen", "dim", "dstate", "ngroups"),
       _io["SelectiveChunkScan"][1], SEL_SIZES,
       lambda s, m: (cdiv(s["dim"], m["BLOCK_D"]), _nchunks(s, m), s["batch"])),
)}


# Who executes launch(): None for Triton's own launcher; ssmrt.plugins.launcher.DriverLauncher runs the AOT
# artifacts (PTX through the CUDA driver) as TensorRT would. Per thread and task, like the op dispatch.
_launcher: ContextVar[Callable | None] = ContextVar("ssmrt_kernel_launcher", default=None)


@contextmanager
def use_launcher(launcher: Callable | None):
    """Within the block, in this thread, every kernel launch goes through launcher(name, tensors, meta)."""
    token = _launcher.set(launcher)
    try:
        yield
    finally:
        _launcher.reset(token)


def launch(name: str, tensors: Mapping, meta: Mapping) -> None:
    """Launches kernel `name` as TensorRT would: tensors by parameter name (without _ptr), the int32 scalars from
    the tensors' shapes, the grid from those sizes and the constexprs `meta`; through Triton, or through the
    launcher use_launcher set."""
    import importlib

    custom = _launcher.get()
    if custom is not None:
        custom(name, tensors, meta)
        return
    k = KERNELS[name]
    sizes = k.resolve({n: tuple(t.shape) for n, t in tensors.items()})
    fn = getattr(importlib.import_module(f"ssmrt.kernels.{k.module}"), k.jit)
    args = [tensors[p.name] for p in k.inputs] + [int(sizes[n]) for n in k.scalars]
    fn[k.grid(sizes, meta)](*args, *(tensors[p.name] for p in k.outputs), **meta)
