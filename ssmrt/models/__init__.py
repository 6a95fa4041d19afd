"""Reference Mamba-1 / Mamba-2 language models and checkpoint loading."""

from .checkpoints import load_config, load_model, save_model
from .config import SSMConfig
from .mamba import Mamba1Mixer, Mamba2Mixer, MambaLM

__all__ = ["Mamba1Mixer", "Mamba2Mixer", "MambaLM", "SSMConfig", "load_config", "load_model", "save_model"]
