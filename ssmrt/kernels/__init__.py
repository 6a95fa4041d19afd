"""GPU kernels for the ssmrt ops (issue 4); no TensorRT types here."""
