"""Fold every norm's scale (and bias) into the linears that read it.

After fusion every norm is a bare `SlicedRMSNorm`, which commutes with any
orthogonal rotation of the residual stream, and the model computes the same function.
"""

from __future__ import annotations

import torch
from torch import nn

from .families import Family, get_module, set_module
from .modeling_sliced import SlicedDecoderLayer, SlicedRMSNorm, wrap_layer


def norm_scale_and_shift(norm: nn.Module, kind: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The affine part of a norm, as (scale, shift) in float64."""
    weight = norm.weight.detach().double()
    if kind == "rms":
        return weight, None
    if kind == "rms_plus_one":
        return 1.0 + weight, None
    if kind == "layer":
        bias = getattr(norm, "bias", None)
        return weight, None if bias is None else bias.detach().double()
    raise ValueError(f"unknown norm kind {kind!r}")


@torch.no_grad()
def fold_into_linears(scale: torch.Tensor, shift: torch.Tensor | None, linears: list[nn.Linear]) -> None:
    """linear(scale * x + shift) == linear'(x), with W' = W diag(scale), b' = b + W shift."""
    for linear in linears:
        weight = linear.weight.double()
        if shift is not None:
            extra = weight @ shift.to(weight.device)
            if linear.bias is None:
                linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                                       device=linear.weight.device))
            linear.bias.copy_((linear.bias.double() + extra).to(linear.bias.dtype))
        linear.weight.copy_((weight * scale.to(weight.device)).to(linear.weight.dtype))


@torch.no_grad()
def centre_output(linear: nn.Linear) -> None:
    """Make what the linear writes mean-free over the stream's coordinates (LayerNorm models)."""
    weight = linear.weight.double()
    linear.weight.copy_((weight - weight.mean(dim=0, keepdim=True)).to(linear.weight.dtype))
    if linear.bias is not None:
        bias = linear.bias.double()
        linear.bias.copy_((bias - bias.mean()).to(linear.bias.dtype))


@torch.no_grad()
def centre_embedding(embedding: nn.Embedding) -> None:
    weight = embedding.weight.double()
    embedding.weight.copy_((weight - weight.mean(dim=-1, keepdim=True)).to(embedding.weight.dtype))


def untie_head(model: nn.Module, family: Family) -> None:
    """Give the head its own weight: fusion changes the head and not the embedding."""
    head = get_module(model, family.head)
    head.weight = nn.Parameter(head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    text_config = getattr(model.config, "get_text_config", lambda: None)()
    if text_config is not None:
        text_config.tie_word_embeddings = False


def norm_eps(model: nn.Module, family: Family) -> float:
    return float(getattr(model.config, family.eps_attr))


@torch.no_grad()
def fuse_embeddings(model: nn.Module, family: Family) -> None:
    """Untie the head and, for LayerNorm models, centre the embedding rows."""
    untie_head(model, family)
    if family.norm_kind == "layer":
        for path in family.embeddings:
            centre_embedding(get_module(model, path))


@torch.no_grad()
def fuse_layer(layer: nn.Module, family: Family, dense: int, eps: float) -> SlicedDecoderLayer:
    """Fold one decoder layer's norms into its linears; returns it wrapped for shortcuts."""
    attn_readers = [get_module(layer, p) for p in family.attn_inputs]
    mlp_readers = [get_module(layer, p) for p in family.mlp_inputs]
    if family.mlp_norm is None:
        attn_readers += mlp_readers  # one norm feeds both branches
    else:
        scale, shift = norm_scale_and_shift(get_module(layer, family.mlp_norm), family.norm_kind)
        fold_into_linears(scale, shift, mlp_readers)
        set_module(layer, family.mlp_norm, SlicedRMSNorm(dense, eps))
    scale, shift = norm_scale_and_shift(get_module(layer, family.attn_norm), family.norm_kind)
    fold_into_linears(scale, shift, attn_readers)
    set_module(layer, family.attn_norm, SlicedRMSNorm(dense, eps))
    if family.norm_kind == "layer":
        centre_output(get_module(layer, family.attn_output))
        centre_output(get_module(layer, family.mlp_output))
    return wrap_layer(layer, family.to_dict())


@torch.no_grad()
def fuse_head(model: nn.Module, family: Family) -> None:
    """Fold the final norm into the LM head (untie it first: see fuse_embeddings)."""
    head = get_module(model, family.head)
    scale, shift = norm_scale_and_shift(get_module(model, family.final_norm), family.norm_kind)
    fold_into_linears(scale, shift, [head])
    set_module(model, family.final_norm, SlicedRMSNorm(model.config.hidden_size, norm_eps(model, family)))


@torch.no_grad()
def fuse(model: nn.Module, family: Family) -> None:
    """Fold all norms into their readers and wrap layers so shortcuts can be added.

    The returned model computes the same logits as before (up to float rounding).
    Streaming runs call the three parts one layer at a time.
    """
    fuse_embeddings(model, family)
    dense, eps = model.config.hidden_size, norm_eps(model, family)
    layers = get_module(model, family.layers)
    for index, layer in enumerate(layers):
        layers[index] = fuse_layer(layer, family, dense, eps)
    fuse_head(model, family)
