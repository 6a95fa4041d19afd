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


def _missing_reason(module: str, name: str):
    """Why `module` cannot be imported, or None; found without importing it. A module set to None in
    sys.modules (how a test run hides an installed package) counts as missing."""
    try:
        found = importlib.util.find_spec(module) is not None
    except ValueError:
        found = False
    return None if found else f"{name} is not installed"


def _trt_reason():
    return _missing_reason("tensorrt", "TensorRT")


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: needs Triton (skipped with the reason when it is not installed); "
                            "the tests beside it in a module run without it")


def pytest_collection_modifyitems(config, items):
    reasons = {"gpu": _gpu_reason(), "trt": _trt_reason(), "triton": _missing_reason("triton", "Triton")}
    for item in items:
        for marker, reason in reasons.items():
            if reason and item.get_closest_marker(marker):
                item.add_marker(pytest.mark.skip(reason=reason))
