"""Rotate and slice the linears and embeddings that touch the residual stream.

`Q` holds basis vectors as columns (dense width x kept width), so a stream in the
new basis is `x @ Q`. All products are done in float64 and cast back.
nn.Linear stores its weight as (out, in).
"""

from __future__ import annotations

import torch
from torch import nn


def _store(param: nn.Parameter, value: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(value.to(param.dtype).contiguous(), requires_grad=param.requires_grad)


@torch.no_grad()
def rotate_input(linear: nn.Linear, Q: torch.Tensor) -> None:
    """The linear now reads a stream expressed in basis Q: W <- W Q."""
    weight = linear.weight
    linear.weight = _store(weight, weight.double() @ Q.to(weight.device, torch.float64))
    linear.in_features = Q.shape[1]


@torch.no_grad()
def rotate_output(linear: nn.Linear, Q: torch.Tensor) -> None:
    """The linear now writes into basis Q: W <- Q^T W, b <- Q^T b."""
    Q = Q.to(linear.weight.device, torch.float64)
    linear.weight = _store(linear.weight, Q.T @ linear.weight.double())
    if linear.bias is not None:
        linear.bias = _store(linear.bias, Q.T @ linear.bias.double())
    linear.out_features = Q.shape[1]


@torch.no_grad()
def rotate_embedding(embedding: nn.Embedding, Q: torch.Tensor) -> None:
    weight = embedding.weight
    embedding.weight = _store(weight, weight.double() @ Q.to(weight.device, torch.float64))
    embedding.embedding_dim = Q.shape[1]


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
