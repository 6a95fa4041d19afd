"""Reference Mamba-1 / Mamba-2 language models and checkpoint loading.

The names are imported on first use (PEP 562), so `SSMConfig`, which the ONNX Runtime path needs, comes
without torch.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "Mamba1Mixer": ".mamba",
    "Mamba2Mixer": ".mamba",
    "MambaLM": ".mamba",
    "SSMConfig": ".config",
    "load_config": ".checkpoints",
    "load_model": ".checkpoints",
    "save_model": ".checkpoints",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name], __name__), name)


def __dir__():
    return __all__
