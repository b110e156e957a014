"""The CUDA target: onnxruntime's CUDA (and optionally TensorRT) execution providers."""
