"""Scratch buffers: one per (shape, dtype, device, slot) and thread, reused, bounded in number."""

import threading

import torch

from lorakit import _buffers
from lorakit._buffers import scratch


def test_the_same_buffer_comes_back_for_the_same_key_only():
    a = scratch((3, 4), torch.float32, torch.device("cpu"), slot=0)
    assert a.shape == (3, 4) and a.dtype == torch.float32
    assert scratch(torch.Size([3, 4]), torch.float32, "cpu", slot=0) is a
    assert scratch((3, 4), torch.float32, "cpu", slot=1) is not a
    assert scratch((3, 4), torch.float64, "cpu", slot=0) is not a
    assert scratch((4, 3), torch.float32, "cpu", slot=0) is not a
    other: list[torch.Tensor] = []
    worker = threading.Thread(target=lambda: other.append(scratch((3, 4), torch.float32, "cpu", slot=0)))
    worker.start()
    worker.join()
    assert other[0] is not a  # each thread has its own


def test_many_shapes_start_over_instead_of_growing():
    for n in range(3 * _buffers.MAX_BUFFERS):
        scratch((n + 1,), torch.float32, "cpu", slot=7)
    assert len(_buffers._local.buffers) <= _buffers.MAX_BUFFERS
