"""The TPU target: ONNX -> JAX -> StableHLO (``jax.export``), checked on XLA:CPU."""
