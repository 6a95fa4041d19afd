"""Triton kernels for the ssmrt ops (the GPU path and the TensorRT plugins' AOT kernels); no TensorRT types here."""
