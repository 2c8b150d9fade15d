"""torch.nn.Conv2d (groups=1): weight (out, in, kh, kw), read as the linear map of each input patch.

A 2-D convolution is, per output position, W·patch with W seen as (out, in·kh·kw) (the weight flattened, a view)
and the patch the matching in·kh·kw window of the input, so an (out, in) delta goes back as
ΔW.view(out, in, kh, kw). The family is its own, "conv2d": a method wraps convolutions only when it lists
"conv2d" in ``@register(layers=...)``, since its other code may assume features in the last dimension. Here
they are not: ``project_in`` is the convolution with A viewed (r, in, kh, kw), the layer's stride, padding,
dilation and padding mode, so its output is (N, r, H', W'), channels first like the layer's own (a 1×1
convolution, i.e. a matmul over dim 1, then applies B). Grouped convolutions (groups > 1) are block-diagonal in
this view; they are refused with a ConfigError rather than read wrong.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.layers._api import register_kind


def _conv(base: nn.Module) -> nn.Conv2d:
    assert isinstance(base, nn.Conv2d)
    if base.groups != 1:
        raise ConfigError(
            f"a Conv2d with groups={base.groups} cannot be read as one (out, in·kh·kw) matrix; lorakit adapters "
            "wrap groups=1 convolutions only. Leave grouped/depthwise convolutions out of targets."
        )
    return base


@register_kind
class Conv2d:
    name = "conv2d"
    family = "conv2d"
    types = (nn.Conv2d,)
    quantized = False

    @staticmethod
    def dims(base: nn.Module) -> tuple[int, int]:
        w = _conv(base).weight  # (out, in, kh, kw)
        return int(w[0].numel()), int(w.shape[0])

    @staticmethod
    def weight_out_in(base: nn.Module) -> torch.Tensor:
        return _conv(base).weight.flatten(1)  # (out, in·kh·kw) view

    @staticmethod
    def to_base_layout(base: nn.Module, delta: torch.Tensor) -> torch.Tensor:
        return delta.reshape(_conv(base).weight.shape)  # (out, in·kh·kw) -> (out, in, kh, kw)

    @staticmethod
    def project_in(base: nn.Module, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        conv = _conv(base)
        return conv._conv_forward(x.to(A.dtype), A.reshape(A.shape[0], *conv.weight.shape[1:]), None)  # (N, r, H', W')

    @staticmethod
    def base_linear(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        conv = _conv(base)
        return conv._conv_forward(x, conv.weight, None)  # (N, out, H', W')

    @staticmethod
    def base_bias(base: nn.Module) -> torch.Tensor | None:
        return base.bias  # type: ignore[return-value]

    @staticmethod
    def forward_with(base: nn.Module, x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        conv = _conv(base)
        return conv._conv_forward(x, W.reshape(conv.weight.shape), conv.bias)  # nn.Conv2d.forward with W
