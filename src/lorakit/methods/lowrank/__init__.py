"""Low-rank ΔW = s·B·A and its rescalings, decompositions and re-parametrisations (LoRA, DoRA, ...)."""
