"""ssmrt: export, run and check Mamba-style state space models on ONNX Runtime and TensorRT."""

from .errors import CheckpointError, SsmrtError

__version__ = "0.1.0"


def load_model(path, dtype=None, device="cpu"):
    """Load an HF (mamba, mamba2, falcon_mamba) or mamba_ssm checkpoint directory as a torch.nn.Module.

    The module's forward(input_ids (batch, seqlen), state=None) returns (logits, new_state).
    """
    from .models.checkpoints import load_model as _load

    return _load(path, dtype=dtype, device=device)


__all__ = ["CheckpointError", "SsmrtError", "__version__", "load_model"]
