"""torch -> ONNX export with ssmrt::* custom ops and their portable fallback bodies."""

from .torch_to_onnx import MODEL_FILE, export, export_model, state_names

__all__ = ["MODEL_FILE", "export", "export_model", "state_names"]
