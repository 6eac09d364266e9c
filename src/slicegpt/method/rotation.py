"""Rotate and slice the weights that touch the residual stream.

`Q` holds basis vectors as columns (dense width x kept width), so a stream in the
new basis is `x @ Q`. Products are done in a float wider than the weights and cast
back: float64 for float32 and float64 weights, float32 for float16 and bfloat16 ones
(whose rounding dwarfs float32's; float64 would make a 7B model's rotations several
times slower on CPUs for no gain in the stored weights).

A `StreamWeight` that reads the stream has it on the last axis of its weight
(nn.Linear stores (out, in); embedding tables, MoE routers and fused expert tensors
(experts, out, in) agree), one that writes it has it on the second-to-last axis and on
the last axis of its bias. So one formula each covers 2D and 3D weights.
"""

from __future__ import annotations

import torch
from torch import nn

from slicegpt.architectures.modeling_sliced import StreamWeight


def exact_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype rotations of weights in `dtype` compute in."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else torch.float64


# Rows of a reader rotated per product: an embedding table or untied head (vocabulary x
# width) would otherwise need two float64 copies of itself at once, the largest transient
# of a run (2 x 1.1 GB for a 152k x 896 table).
ROWS_PER_PRODUCT = 4096


@torch.no_grad()
def rotate_input(reader: StreamWeight, Q: torch.Tensor) -> None:
    """The weight now reads a stream expressed in basis Q: W <- W Q."""
    weight = reader.weight
    wide = exact_dtype(weight.dtype)
    Q = Q.to(weight.device, wide)
    if weight.dim() != 2 or weight.shape[0] <= ROWS_PER_PRODUCT:
        reader.replace(weight.to(wide) @ Q)
        return
    rotated = torch.empty(weight.shape[0], Q.shape[1], dtype=weight.dtype, device=weight.device)
    for start in range(0, weight.shape[0], ROWS_PER_PRODUCT):
        rows = slice(start, start + ROWS_PER_PRODUCT)
        rotated[rows] = weight[rows].to(wide) @ Q
    reader.replace(rotated)


@torch.no_grad()
def rotate_output(writer: StreamWeight, Q: torch.Tensor) -> None:
    """The weight now writes into basis Q: W <- Q^T W, b <- b Q."""
    wide = exact_dtype(writer.weight.dtype)
    Q = Q.to(writer.weight.device, wide)
    bias = writer.bias
    writer.replace(Q.T @ writer.weight.to(wide), None if bias is None else bias.to(wide) @ Q)


def shortcut(Q_from: torch.Tensor, Q_to: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    """The skip path between two bases: x_to = x_from @ (Q_from^T Q_to); to dense coordinates
    (the weight is Q_from itself) where Q_to is None."""
    wide = exact_dtype(dtype)
    Q_from = Q_from.to(wide)
    weight = Q_from if Q_to is None else Q_to.to(Q_from.device, wide).T @ Q_from
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=Q_from.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.to(dtype))
    return linear


def change_basis(x: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Activations in basis Q, in their own dtype (float64 only where they already are)."""
    return x @ Q.to(x.device, x.dtype)


def to_dense(x: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Activations in basis Q back in the dense coordinates (the dropped directions as zeros)."""
    return x @ Q.T.to(x.device, x.dtype)


def mean_reflection(dim: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """The unit vector v of the Householder reflection H = I - 2 v v^T that swaps e_0 and
    u = ones / sqrt(dim): H is symmetric and orthogonal, and its first column is u. In the
    basis H, coordinate 0 of the stream is its component along u (LayerNorm models)."""
    v = torch.full((dim,), -dim ** -0.5, dtype=dtype, device=device)
    v[0] += 1.0
    return v / v.norm()


def reflect(t: torch.Tensor, axis: int) -> torch.Tensor:
    """`t` multiplied by the mean reflection H along `axis` (H = H^T: the side does not matter)."""
    v = mean_reflection(t.shape[axis], t.dtype, t.device)
    moved = t.movedim(axis, -1)
    return (moved - 2.0 * (moved @ v).unsqueeze(-1) * v).movedim(-1, axis)
