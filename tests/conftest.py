import importlib.util
import os

import pytest


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# Without a GPU the Triton kernels run in Triton's interpreter, on CPU tensors. Triton reads this when a
# kernel is decorated, so it is set here, before any test module imports ssmrt.kernels.
if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _gpu_reason():
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    return None if torch.cuda.is_available() else "no CUDA GPU on this machine"


def _trt_reason():
    return None if importlib.util.find_spec("tensorrt") is not None else "TensorRT is not installed"


def pytest_collection_modifyitems(config, items):
    gpu, trt = _gpu_reason(), _trt_reason()
    for item in items:
        if gpu and "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=gpu))
        if trt and "trt" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=trt))
