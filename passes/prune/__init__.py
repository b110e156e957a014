"""Pruning passes: remove weights (structured: heads, FFN channels, layers; unstructured: magnitude, Wanda, N:M)."""
