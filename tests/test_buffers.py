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


def test_scratch_view_grows_one_buffer_per_slot_and_reuses_it_for_smaller_shapes():
    from lorakit._buffers import scratch_view

    big = scratch_view((4, 5), torch.float32, "cpu", slot=3)
    assert big.shape == (4, 5) and big.is_contiguous()
    small = scratch_view((2, 3), torch.float32, "cpu", slot=3)
    assert small.shape == (2, 3) and small.data_ptr() == big.data_ptr()  # the same memory, no new buffer
    bigger = scratch_view((6, 5), torch.float32, "cpu", slot=3)
    assert bigger.numel() == 30 and scratch_view((6, 5), torch.float32, "cpu", slot=3).data_ptr() == bigger.data_ptr()
    assert scratch_view((2, 3), torch.float32, "cpu", slot=4).data_ptr() != bigger.data_ptr()  # slots are apart
    assert scratch_view((2, 3), torch.float64, "cpu", slot=3).dtype == torch.float64


def test_buffers_made_under_inference_mode_are_writable_outside_it():
    from lorakit._buffers import scratch_view

    with torch.inference_mode():
        a = scratch((2, 2), torch.float32, "cpu", slot=5)
        b = scratch_view((7,), torch.float32, "cpu", slot=5)
    a.fill_(1.0)  # an inference tensor would raise here
    b.fill_(2.0)
    assert not a.is_inference() and not b.is_inference()
