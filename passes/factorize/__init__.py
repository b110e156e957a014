"""Factorization passes: a linear layer W ≈ U·V as two smaller MatMuls where that saves bytes and time."""
