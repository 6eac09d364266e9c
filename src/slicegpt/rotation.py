"""Rotate and slice the weights that touch the residual stream.

`Q` holds basis vectors as columns (dense width x kept width), so a stream in the
new basis is `x @ Q`. All products are done in float64 and cast back.

A `StreamWeight` that reads the stream has it on the last axis of its weight
(nn.Linear stores (out, in); embedding tables, MoE routers and fused expert tensors
(experts, out, in) agree), one that writes it has it on the second-to-last axis and on
the last axis of its bias. So one formula each covers 2D and 3D weights.
"""

from __future__ import annotations

import torch
from torch import nn

from .modeling_sliced import StreamWeight


@torch.no_grad()
def rotate_input(reader: StreamWeight, Q: torch.Tensor) -> None:
    """The weight now reads a stream expressed in basis Q: W <- W Q."""
    weight = reader.weight
    reader.replace(weight.double() @ Q.to(weight.device, torch.float64))


@torch.no_grad()
def rotate_output(writer: StreamWeight, Q: torch.Tensor) -> None:
    """The weight now writes into basis Q: W <- Q^T W, b <- b Q."""
    Q = Q.to(writer.weight.device, torch.float64)
    bias = writer.bias
    writer.replace(Q.T @ writer.weight.double(), None if bias is None else bias.double() @ Q)


def shortcut(Q_from: torch.Tensor, Q_to: torch.Tensor, dtype: torch.dtype) -> nn.Linear:
    """The skip path between two bases: x_to = x_from @ (Q_from^T Q_to)."""
    Q_from, Q_to = Q_from.double(), Q_to.to(Q_from.device, torch.float64)
    linear = nn.Linear(Q_from.shape[1], Q_to.shape[1], bias=False, device=Q_from.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_((Q_to.T @ Q_from).to(dtype))
    return linear


def change_basis(x: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Activations in basis Q, in their own dtype (float64 only where they already are)."""
    return x @ Q.to(x.device, x.dtype)


def to_dense(x: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Activations in basis Q back in the dense coordinates (the dropped directions as zeros)."""
    return x @ Q.T.to(x.device, x.dtype)
