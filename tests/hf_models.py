"""Tiny random HF transformers models for the parity tests, saved with save_pretrained.

A test names the config it builds by its id (`hf_model("mamba2-g1")`), never by its place in a list. Building one
needs transformers: `hf_model` skips the calling test when it is missing, so only the tests that build HF models
skip, not the modules around them.
"""

from __future__ import annotations

import pytest
import torch

VOCAB = 97

# id -> (family, config kwargs): several shapes per family, odd sizes, d_state 16/64/128, conv widths 4 and
# others, tied and untied, a dt limit.
HF_CONFIGS: dict[str, tuple[str, dict]] = {
    "mamba-base": ("mamba", dict(hidden_size=48, num_hidden_layers=2, state_size=16)),
    "mamba-untied-d64-k3-bias": ("mamba", dict(hidden_size=40, num_hidden_layers=3, state_size=64, conv_kernel=3,
                                               tie_word_embeddings=False, use_bias=True, use_conv_bias=False,
                                               time_step_rank=5, expand=3)),
    "falcon_mamba-base": ("falcon_mamba", dict(hidden_size=48, num_hidden_layers=2, state_size=16)),
    "falcon_mamba-untied-d128-k2": ("falcon_mamba", dict(hidden_size=36, num_hidden_layers=2, state_size=128,
                                                         conv_kernel=2, tie_word_embeddings=False)),
    "mamba2-g1": ("mamba2", dict(hidden_size=64, num_hidden_layers=2, state_size=16, num_heads=8, head_dim=16,
                                 n_groups=1, chunk_size=8)),
    "mamba2-g2-d64-k3-limit-tied": ("mamba2", dict(hidden_size=36, num_hidden_layers=2, state_size=64, num_heads=6,
                                                   head_dim=12, n_groups=2, conv_kernel=3, chunk_size=5,
                                                   time_step_limit=(0.01, 0.2), tie_word_embeddings=True)),
    "mamba2-g2-d128-bias": ("mamba2", dict(hidden_size=64, num_hidden_layers=3, state_size=128, num_heads=4,
                                           head_dim=32, n_groups=2, chunk_size=16, use_bias=True)),
}


def hf_config(config_id: str) -> tuple[str, dict]:
    """(family, config kwargs) of the config called `config_id`."""
    if config_id not in HF_CONFIGS:
        raise KeyError(f"no HF test config {config_id!r}; there are {', '.join(HF_CONFIGS)}")
    family, kw = HF_CONFIGS[config_id]
    return family, dict(kw)


def hf_classes(family: str):
    """(config class, model class) of an HF family; skips the calling test where transformers is missing."""
    transformers = pytest.importorskip("transformers")
    return {
        "mamba": (transformers.MambaConfig, transformers.MambaForCausalLM),
        "falcon_mamba": (transformers.FalconMambaConfig, transformers.FalconMambaForCausalLM),
        "mamba2": (transformers.Mamba2Config, transformers.Mamba2ForCausalLM),
    }[family]


def hf_model(config_id: str, seed: int = 0):
    """A random HF model of the config `config_id` whose every parameter is non-trivial (norm weights, D, biases
    perturbed)."""
    family, kw = hf_config(config_id)
    config_cls, model_cls = hf_classes(family)
    torch.manual_seed(seed)
    return perturbed(model_cls(config_cls(vocab_size=VOCAB, **kw)).eval(), seed)


def perturbed(model, seed: int):
    """model with its norm weights, D and biases (not the dt ones) moved off HF's init, whose 1 / 0 values
    would hide a missing or misplaced one."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".D") or name.endswith("bias") and "dt" not in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def save_hf(model, path, **kw):
    model.save_pretrained(str(path), **kw)
    return path
