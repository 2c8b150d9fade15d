"""Structured ΔW that is not a plain low-rank product (block, circulant, Fourier, Kronecker, tensor, ...)."""
