"""Reference Mamba-1 / Mamba-2 language models and checkpoint loading.

The names are imported on first use (PEP 562), so `SSMConfig`, which the ONNX Runtime path needs, comes
without torch.
"""

from __future__ import annotations

from .._lazy import lazy_attributes

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

__getattr__, __dir__ = lazy_attributes(__name__, _WHERE)
