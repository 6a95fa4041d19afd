"""Tiny random HF transformers models for the parity tests, saved with save_pretrained."""

from __future__ import annotations

import torch

VOCAB = 97

# (family, id, config kwargs): several shapes per family, odd sizes, d_state 16/64/128, conv widths 4 and
# others, tied and untied, a dt limit.
HF_CONFIGS = [
    ("mamba", "base", dict(hidden_size=48, num_hidden_layers=2, state_size=16)),
    ("mamba", "untied-d64-k3-bias", dict(hidden_size=40, num_hidden_layers=3, state_size=64, conv_kernel=3,
                                          tie_word_embeddings=False, use_bias=True, use_conv_bias=False,
                                          time_step_rank=5, expand=3)),
    ("falcon_mamba", "base", dict(hidden_size=48, num_hidden_layers=2, state_size=16)),
    ("falcon_mamba", "untied-d128-k2", dict(hidden_size=36, num_hidden_layers=2, state_size=128, conv_kernel=2,
                                            tie_word_embeddings=False)),
    ("mamba2", "g1", dict(hidden_size=64, num_hidden_layers=2, state_size=16, num_heads=8, head_dim=16,
                          n_groups=1, chunk_size=8)),
    ("mamba2", "g2-d64-k3-limit-tied", dict(hidden_size=36, num_hidden_layers=2, state_size=64, num_heads=6,
                                            head_dim=12, n_groups=2, conv_kernel=3, chunk_size=5,
                                            time_step_limit=(0.01, 0.2), tie_word_embeddings=True)),
    ("mamba2", "g2-d128-bias", dict(hidden_size=64, num_hidden_layers=3, state_size=128, num_heads=4, head_dim=32,
                                    n_groups=2, chunk_size=16, use_bias=True)),
]


def hf_model(family: str, seed: int = 0, **kw):
    """A random HF model whose every parameter is non-trivial (norm weights, D, biases perturbed)."""
    import transformers

    cls = {
        "mamba": (transformers.MambaConfig, transformers.MambaForCausalLM),
        "falcon_mamba": (transformers.FalconMambaConfig, transformers.FalconMambaForCausalLM),
        "mamba2": (transformers.Mamba2Config, transformers.Mamba2ForCausalLM),
    }[family]
    torch.manual_seed(seed)
    model = cls[1](cls[0](vocab_size=VOCAB, **kw)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".D") or name.endswith("bias") and "dt" not in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def save_hf(model, path, **kw):
    model.save_pretrained(str(path), **kw)
    return path
