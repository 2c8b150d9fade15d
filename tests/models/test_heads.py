"""Head hooks: the contiguous-input hook is installed once, declared layout-only, and changes no value."""

from __future__ import annotations

import torch

from lorakit.models.heads import contiguous_head, is_layout_only
from lorakit.testing import tiny_llama


def test_contiguous_head_is_installed_once_declared_layout_only_and_keeps_values():
    model = tiny_llama()
    head = model.get_output_embeddings()
    strided = torch.randn(3, 5, 64)[:, -1:, :]  # (B, 1, d), a view with the whole rows' strides
    with torch.no_grad():
        want = head(strided.contiguous())
        assert contiguous_head(contiguous_head(model)) is model
        seen: list[bool] = []
        head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].is_contiguous()))
        got = head(strided)
    hooks = list(head._forward_pre_hooks.values())
    assert len(hooks) == 2 and is_layout_only(hooks[0]) and not is_layout_only(hooks[1])
    assert seen == [True] and not strided.is_contiguous()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
