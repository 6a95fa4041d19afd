"""TensorRT plugins for the ssmrt::* ops.

- launch.py: each kernel's launch in TensorRT's AOT form (input pointers, int32 scalars, output pointers; the
  grid from the input shapes), with no TensorRT: the Triton wrappers and the plugins both launch from it;
- launcher.py: LaunchSpec (what an aot_impl returns) and a CUDA driver-API launcher that runs the AOT PTX as
  TensorRT would (TorchRunner(kernels="aot"));
- trt.py: the tensorrt.plugin registrations; `register()` imports TensorRT only when called.
"""


def register() -> None:
    """Registers the ssmrt plugins with TensorRT (see ssmrt.plugins.trt.register)."""
    from .trt import register as _register

    _register()


__all__ = ["register"]
