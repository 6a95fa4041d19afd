"""The kernels' AOT artifacts launched as TensorRT's AOT plugin runtime launches them, on the CUDA driver API
(cuda-python's `cuda.bindings.driver`; the `[gpu]` extra), so that a model can run on the very PTX a TensorRT
engine embeds, with no TensorRT.

For each kernel specialisation (kernel, target SM, activation and state types, constexprs) `launch_spec`
compiles the kernel with Triton, cuts its PTX entry down to the launch's parameters (ssmrt.kernels.aot:
contract_ptx) and records what TensorRT's `aot_impl` returns: the entry name, the PTX, the block size and the
dynamic shared memory; the grid and the int32 scalars follow from the input shapes (ssmrt.plugins.launch).
`DriverLauncher` loads each PTX once per device with cuModuleLoadData (into torch's primary context of the
tensors' device), raises the dynamic shared memory limit where a kernel needs more than 48 KB, and calls
cuLaunchKernel with input pointers, int32 scalars, output pointers, in that order, on torch's current stream.
`with use_launcher(DriverLauncher()):` routes every launch of the ops' kernels through it;
TorchRunner(kernels="aot") runs a model's SSM ops that way (the two fused norms, which are no plugin's, keep
Triton's launcher).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

from ..errors import SsmrtError
from .launch import KERNELS

TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
DEFAULT_MAX_SHARED = 48 * 1024  # above this a kernel must ask for its dynamic shared memory explicitly


@dataclass(frozen=True)
class LaunchSpec:
    """What a TensorRT AOT plugin's aot_impl returns for one kernel specialisation (no TensorRT types)."""

    kernel: str
    sm: int
    entry: str
    ptx: str
    num_warps: int
    shared: int
    constexprs: dict = field(hash=False)
    divisible: tuple[str, ...] = ()  # the parameters compiled as multiples of 16 (see aot.compile_kernel)

    @property
    def block(self) -> int:
        return 32 * self.num_warps

    def grid(self, sizes) -> tuple:
        """The grid for the named sizes (ints, or TensorRT size expressions), padded to three axes."""
        g = tuple(KERNELS[self.kernel].grid(sizes, self.constexprs))
        return g + (1,) * (3 - len(g))


def launch_spec(kernel: str, sm: int, act: str, state: str, meta: dict, divisible: tuple[str, ...] = ()
                ) -> LaunchSpec:
    """Compiles `kernel` for compute capability `sm` with activation / state types act / state (Triton names:
    fp32, fp16, bf16), constexprs `meta` and the parameters `divisible` by 16 (Kernel.divisible). Needs Triton
    outside its interpreter (TRITON_INTERPRET unset)."""
    from ..kernels.aot import compile_kernel, contract_ptx

    compiled = compile_kernel(kernel, sm, act, meta, state, divisible)
    ptx = contract_ptx(compiled, len(KERNELS[kernel].parameters))
    md = compiled.metadata
    return LaunchSpec(kernel, sm, md.name, ptx, md.num_warps, md.shared, dict(meta), tuple(divisible))


def _check(result, what: str):
    """cuda-python returns (CUresult, values...): the values, or SsmrtError naming the call."""
    from cuda.bindings import driver

    err, *values = result if isinstance(result, tuple) else (result,)
    if err != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(err)
        raise SsmrtError(f"CUDA driver: {what} failed ({name.decode() if isinstance(name, bytes) else name})")
    return values[0] if len(values) == 1 else values


class DriverLauncher:
    """launcher(name, tensors, meta) for ssmrt.plugins.launch.use_launcher: torch CUDA tensors in, the
    kernels' AOT PTX launched through the driver API. Modules are loaded once per specialisation."""

    def __init__(self):
        try:
            from cuda.bindings import driver  # noqa: F401
        except ImportError:
            raise SsmrtError("the AOT launcher needs cuda-python (pip install 'ssmrt[gpu]')") from None
        self._loaded: dict[tuple, tuple[LaunchSpec, object]] = {}

    def _function(self, kernel: str, device, act: str, state: str, meta: dict, divisible: tuple[str, ...]):
        import torch
        from cuda.bindings import driver

        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        # a module is loaded into one device's context: the device is part of the key
        key = (kernel, index, major * 10 + minor, act, state, tuple(sorted(meta.items())), divisible)
        if key not in self._loaded:
            spec = launch_spec(kernel, major * 10 + minor, act, state, dict(meta), divisible)
            torch.cuda.init()  # torch's primary context, current on this thread: the module lives beside its tensors
            ctx = _check(driver.cuDevicePrimaryCtxRetain(_check(driver.cuDeviceGet(index), "cuDeviceGet")),
                         "cuDevicePrimaryCtxRetain")
            previous = _check(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")
            _check(driver.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
            try:
                module = _check(driver.cuModuleLoadData(spec.ptx.encode() + b"\0"), f"cuModuleLoadData({kernel})")
            finally:
                _check(driver.cuCtxSetCurrent(previous), "cuCtxSetCurrent")
            fn = _check(driver.cuModuleGetFunction(module, spec.entry.encode()), f"cuModuleGetFunction({kernel})")
            if spec.shared > DEFAULT_MAX_SHARED:
                attr = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
                _check(driver.cuFuncSetAttribute(fn, attr, spec.shared), f"cuFuncSetAttribute({kernel})")
            self._loaded[key] = (spec, fn)
        return self._loaded[key]

    def __call__(self, kernel: str, tensors, meta) -> None:
        import torch
        from cuda.bindings import driver

        k = KERNELS[kernel]
        def triton_type(kind: str) -> str:  # of the first pointer of that kind ("fp32" where there is none)
            ptr = next((p for p in k.pointers if p.dtype == kind), None)
            return TRITON_TYPES[str(tensors[ptr.name].dtype).removeprefix("torch.")] if ptr else "fp32"

        first = tensors[k.inputs[0].name]
        act, state = triton_type("act"), triton_type("state")
        sizes = k.resolve({n: tuple(t.shape) for n, t in tensors.items()})
        # compiled as a plugin is for an engine (16-byte aligned buffers, the model's dimensions known), unless a
        # buffer here is not aligned (a view at an odd offset): then for no alignment
        aligned = all(tensors[p.name].data_ptr() % 16 == 0 for p in k.pointers)
        spec, fn = self._function(kernel, first.device, act, state, dict(meta), k.divisible(sizes, aligned))
        if any(t.device != first.device for t in tensors.values()):
            raise SsmrtError(f"{kernel}: every tensor must be on {first.device}")
        values = ([ctypes.c_void_p(tensors[p.name].data_ptr()) for p in k.inputs]
                  + [ctypes.c_int32(int(sizes[n])) for n in k.scalars]
                  + [ctypes.c_void_p(tensors[p.name].data_ptr()) for p in k.outputs])
        params = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
        gx, gy, gz = spec.grid(sizes)
        stream = torch.cuda.current_stream(first.device).cuda_stream
        _check(driver.cuLaunchKernel(fn, gx, gy, gz, spec.block, 1, 1, spec.shared, stream, ctypes.addressof(params),
                                     0), f"cuLaunchKernel({kernel})")
