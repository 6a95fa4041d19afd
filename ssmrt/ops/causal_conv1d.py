"""CausalConv1d: depthwise causal convolution over time, carrying the last K-1 inputs as state.

The op's interface (inputs, outputs, shapes, attributes, which inputs are optional or float32) is
ssmrt.ops.spec.CAUSAL_CONV1D; the design is docs/design.md.

Semantics: y[t] = act(bias + sum_k weight[:, k] * window[t + k]) over the window of the last width-1 inputs
(conv_state, zeros when empty) followed by x; present_conv_state is the window's last width-1 entries.
activation is "silu" or "none".
"""

from __future__ import annotations

import torch

from .common import acc_dtype, silu

ACTIVATIONS = ("silu", "none")


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    conv_state: torch.Tensor | None = None,
    activation: str | None = "silu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference causal depthwise conv1d with state.

    x: (batch, seqlen, dim)
    weight: (dim, width)
    bias: (dim,) or None
    conv_state: (batch, dim, width - 1) or None (zeros)
    activation: "silu", "none" or None
    returns y: (batch, seqlen, dim) in x.dtype, new_conv_state: (batch, dim, width - 1) in conv_state's dtype
    (x.dtype when conv_state is None)
    """
    if activation is None:
        activation = "none"
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    batch, seqlen, dim = x.shape
    width = weight.shape[-1]
    state_dtype = conv_state.dtype if conv_state is not None else x.dtype
    dtype = acc_dtype(x, weight, bias, conv_state)
    if conv_state is None:
        conv_state = x.new_zeros(batch, dim, width - 1)

    # 1. Prepend the carried inputs: xs[:, :, j] is input time j - (width - 1).
    xs = torch.cat([conv_state.to(dtype), x.transpose(1, 2).to(dtype)], dim=-1)
    # 2. y_t = sum_k weight[:, k] * x_{t - (width - 1) + k}
    w = weight.to(dtype)
    y = xs[:, :, 0:seqlen] * w[:, 0, None]
    for k in range(1, width):
        y = y + xs[:, :, k : k + seqlen] * w[:, k, None]
    if bias is not None:
        y = y + bias.to(dtype)[:, None]
    if activation == "silu":
        y = silu(y)
    # 3. The new state is the last width-1 inputs, reaching back into the old state when seqlen < width-1.
    new_state = xs[:, :, xs.shape[-1] - (width - 1) :]
    return y.transpose(1, 2).to(x.dtype), new_state.to(state_dtype)

