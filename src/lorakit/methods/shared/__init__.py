"""Updates built from tensors shared across layers (random projections, vector banks, shared factors)."""
