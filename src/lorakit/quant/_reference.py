"""A pure-torch reference quantizer: blockwise absmax on a normal-quantile grid (NF4 and its 2/3-bit kin).

Semantics: split W (flattened row-major) into blocks of ``block`` weights; per block, absmax = max |w|;
each w becomes the index of the nearest grid value to w / absmax (ties to the lower one); dequantized,
ŵ = grid[index] · absmax. At 4 bits the grid is NF4's (QLoRA's create_normal_map with offset 0.9677083):
the packed bytes (two indices per byte, the first in the high nibble) and the absmax scales equal
bitsandbytes' ``quantize_4bit(quant_type="nf4", blocksize=64)`` exactly. LoftQ uses the same
construction at 2 and 3 bits; those indices are stored one per byte.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NF_OFFSET = 0.9677083  # QLoRA's offset: the outermost quantile, chosen so that ±1 are both on the grid


def normal_grid(bits: int) -> torch.Tensor:
    """The 2**bits sorted values in [-1, 1] of the normal-float grid: 2**(bits-1) positive normal quantiles,
    2**(bits-1) − 1 negative ones and an exact 0, divided by the largest (float32, as bitsandbytes' table)."""
    if bits not in (2, 3, 4):
        raise ValueError(f"normal_grid: bits must be 2, 3 or 4, got {bits!r}.")
    half = 2 ** (bits - 1)
    pos = torch.special.ndtri(torch.linspace(NF_OFFSET, 0.5, half + 1)[:-1].double()).float()  # (half,)
    neg = -torch.special.ndtri(torch.linspace(NF_OFFSET, 0.5, half)[:-1].double()).float()  # (half - 1,)
    values = torch.cat([pos, neg, torch.zeros(1)]).sort().values
    return values / values.max()


@dataclass(frozen=True)
class Blockwise:
    """A blockwise-quantized tensor: ``codes`` (packed two per byte at 4 bits, else one per byte), ``absmax``
    (one float32 per block), the grid, the original shape and the block size."""

    codes: torch.Tensor
    absmax: torch.Tensor
    grid: torch.Tensor
    shape: tuple[int, ...]
    block: int

    @property
    def bits(self) -> int:
        return int(self.grid.numel()).bit_length() - 1


def quantize(W: torch.Tensor, bits: int = 4, block: int = 64) -> Blockwise:
    """W quantized blockwise on the ``bits``-bit normal grid (the module docstring's semantics)."""
    grid = normal_grid(bits).to(W.device)
    flat = W.detach().reshape(-1).float()  # (n,)
    n = flat.numel()
    pad = -n % block
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, block)  # (n_blocks, block); zero padding
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)[:n]  # (n,)
    if bits == 4:
        scaled = torch.nn.functional.pad(scaled, (0, n % 2))  # an odd count ends on the code of 0.0
    idx = torch.bucketize(scaled, (grid[:-1] + grid[1:]) / 2).to(torch.uint8)  # nearest value, ties down
    if bits == 4:
        idx = ((idx[0::2] << 4) | idx[1::2])[:, None]  # (ceil(n/2), 1): bitsandbytes' packing
    return Blockwise(idx, absmax, grid, tuple(W.shape), block)


def dequantize(q: Blockwise) -> torch.Tensor:
    """ŵ = grid[index] · absmax of its block, float32, in the original shape."""
    n = 1
    for d in q.shape:
        n *= d
    idx = q.codes.reshape(-1).long()
    if q.bits == 4:
        idx = torch.stack([idx >> 4, idx & 0xF], dim=1).reshape(-1)
    values = q.grid[idx[:n]]  # (n,)
    scales = q.absmax.repeat_interleave(q.block)[:n]  # (n,)
    return (values * scales).view(q.shape)


def fake_quantize(W: torch.Tensor, bits: int = 4, block: int = 64) -> torch.Tensor:
    """dequantize(quantize(W)): W rounded onto the grid, float32."""
    return dequantize(quantize(W, bits, block))
