"""TensorRT plugins for the ssmrt::* ops (TensorRT is imported lazily)."""
