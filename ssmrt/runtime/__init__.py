"""Session and backends (torch, onnxruntime, tensorrt) behind one runner interface."""
