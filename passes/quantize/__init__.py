"""Quantization and precision passes: weights and activations into lower-precision standard ONNX."""
