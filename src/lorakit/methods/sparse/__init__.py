"""Sparse ΔW: a fixed mask of trainable weight entries."""
