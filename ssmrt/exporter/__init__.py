"""TorchToONNX export with ssmrt::* custom ops (issue 3)."""
