"""Session and runners (torch, onnxruntime; tensorrt later) behind one interface."""

from .backends import (
    BACKENDS,
    OnnxRuntimeRunner,
    OnnxRuntimeRunnerFromArtifact,
    Runner,
    TorchRunner,
    TorchRunnerFromCheckpoint,
    is_artifact,
    runner_from_path,
)
from .sampling import sample
from .session import Session, Snapshot

__all__ = [
    "BACKENDS",
    "OnnxRuntimeRunner",
    "OnnxRuntimeRunnerFromArtifact",
    "Runner",
    "Session",
    "Snapshot",
    "TorchRunner",
    "TorchRunnerFromCheckpoint",
    "is_artifact",
    "runner_from_path",
    "sample",
]
