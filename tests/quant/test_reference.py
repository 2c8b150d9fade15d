"""The pure-torch reference quantizer: NF4 bytes and scales equal bitsandbytes' exactly; the 2/3-bit grids."""

from __future__ import annotations

import pytest
import torch

from lorakit.quant import _reference as R

bnbf = pytest.importorskip("bitsandbytes.functional")


def test_nf4_grid_is_bitsandbytes_table():
    from bitsandbytes.backends.utils import _get_4bit_code

    assert torch.equal(R.normal_grid(4), _get_4bit_code("nf4", "cpu"))


@pytest.mark.parametrize("shape", [(64, 128), (96, 200), (7, 10), (5, 13)])  # whole, partial, odd-count blocks
def test_nf4_bytes_and_absmax_equal_bitsandbytes(shape):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.05
    W.view(-1)[5] = 0.3  # an outlier in the first block
    ours = R.quantize(W, bits=4, block=64)
    packed, state = bnbf.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(ours.codes, packed)
    assert torch.equal(ours.absmax, state.absmax)
    if shape[-1] % 2 == 0:  # (bitsandbytes dequantizes an odd row length through torch.compile: slow)
        assert torch.equal(R.dequantize(ours), bnbf.dequantize_4bit(packed, state))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_normal_grids(bits):
    grid = R.normal_grid(bits)
    assert grid.numel() == 2**bits and torch.all(grid[1:] > grid[:-1])
    assert grid[0] == -1 and grid[-1] == 1 and (grid == 0).sum() == 1  # ±1 and an exact zero are on the grid
    W = torch.randn(32, 128)
    q = R.quantize(W, bits)
    W_hat = R.dequantize(q)
    assert torch.equal(R.fake_quantize(W_hat, bits), W_hat)  # grid points stay where they are
    # each weight lands on the nearest grid value of its block
    scaled = (W.view(-1, 64) / q.absmax[:, None]).reshape(-1)
    nearest = grid[(scaled[:, None] - grid[None]).abs().argmin(dim=1)]
    torch.testing.assert_close(W_hat.view(-1, 64), (nearest.view(-1, 64) * q.absmax[:, None]), rtol=0, atol=0)


def test_fewer_bits_more_error():
    W = torch.randn(64, 256)
    errors = [float((R.fake_quantize(W, b) - W).norm()) for b in (2, 3, 4)]
    assert errors[0] > errors[1] > errors[2] > 0


def test_bad_bits_is_a_clear_error():
    with pytest.raises(ValueError, match="bits must be 2, 3 or 4"):
        R.normal_grid(5)
