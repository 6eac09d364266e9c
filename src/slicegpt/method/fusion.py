"""Fold every norm's scale (and bias) into the weights that read it.

After fusion every norm is a bare `SlicedRMSNorm`, which commutes with any
orthogonal rotation of the residual stream, and the model computes the same function.

A LayerNorm first subtracts the stream's mean, its component along u = ones / sqrt(D).
Two ways make it a bare norm:
  * centring (untied heads): embeddings and writers become mean-free, so the stream has
    no component along u; the embeddings change, so a tied head must be untied;
  * the mean axis (tied heads): the stream moves into the basis H (`rotation.reflect`),
    whose first vector is u; each LayerNorm becomes a norm that ignores coordinate 0,
    nothing is centred, and the head reads the untouched embeddings through a map after
    the final norm that writes coordinate 0 too. It costs one coordinate of width.
"""

from __future__ import annotations

import torch
from torch import nn

from slicegpt.errors import SliceGPTError
from slicegpt.architectures.family import Family, get_module, set_module
from slicegpt.architectures.norms import norm_module_eps, norm_scale_and_shift
from slicegpt.architectures.modeling_sliced import (NormThenMap, SlicedDecoderLayer, SlicedRMSNorm, StreamWeight,
                                                    linearise_conv1d, stream_weight, wrap_layer)
from slicegpt.method.rotation import reflect


@torch.no_grad()
def fold_into_linears(scale: torch.Tensor, shift: torch.Tensor | None, readers: list[StreamWeight],
                      mean_axis: bool = False) -> list[int]:
    """reader(scale * x + shift) == reader'(x), with W' = W diag(scale), b' = b + W shift.

    A reader's stream axis is the last axis of its weight, so this also folds into MoE routers
    and fused (experts, out, in) expert tensors. With `mean_axis` the reader then reads the
    stream in the basis H (W' H, in the same wide product). Returns the indices of the readers
    that had no bias and now have one (a LayerNorm shift becomes a bias).
    """
    gained = []
    for index, reader in enumerate(readers):
        weight = reader.weight.double()
        bias = None
        if shift is not None:
            extra = weight @ shift.to(weight.device)
            if reader.bias is None and not isinstance(reader.owner, nn.Linear):
                raise SliceGPTError(f"cannot fold a norm's shift into {type(reader.owner).__name__}.{reader.name}, "
                                    "which has no bias")
            if reader.bias is None:
                gained.append(index)
            bias = extra if reader.bias is None else reader.bias.double() + extra
        weight = weight * scale.to(weight.device)
        reader.replace(reflect(weight, -1) if mean_axis else weight, bias)
    return gained


@torch.no_grad()
def reflect_output(writer: StreamWeight) -> None:
    """The weight writes the stream in the basis H (W <- H W, b <- b H): LayerNorm models, tied head."""
    bias = writer.bias
    writer.replace(reflect(writer.weight.double(), -2), None if bias is None else reflect(bias.double(), -1))


@torch.no_grad()
def reflect_embedding(embedding: nn.Embedding) -> None:
    weight = embedding.weight
    embedding.weight.copy_(reflect(weight.double(), -1).to(weight.dtype))


@torch.no_grad()
def centre_output(writer: StreamWeight) -> None:
    """Make what the weight writes mean-free over the stream's coordinates (LayerNorm models)."""
    weight = writer.weight.double()
    bias = writer.bias
    if bias is not None:
        bias = bias.double()
        bias = bias - bias.mean(dim=-1, keepdim=True)
    writer.replace(weight - weight.mean(dim=-2, keepdim=True), bias)


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


def head_is_tied(model: nn.Module, family: Family) -> bool:
    head = get_module(model, family.head)
    return any(head.weight is get_module(model, p).weight for p in family.embeddings)


def can_keep_tied(model: nn.Module, family: Family) -> bool:
    """A tied head can stay tied in every family (LayerNorm ones through the mean axis)."""
    return head_is_tied(model, family)


def uses_mean_axis(family: Family, tied: bool) -> bool:
    """LayerNorm models whose head stays tied keep the mean direction as coordinate 0."""
    return tied and family.norm_kind == "layer"


@torch.no_grad()
def final_map(norm: nn.Module, kind: str, dense: int, eps: float, like: torch.Tensor,
              mean_axis: bool = False) -> NormThenMap:
    """Final norm whose scale (and shift) moves into a dense-width map: exact, and rotatable.

    With `mean_axis` the map reads and writes the basis H: H diag(scale) H, bias shift H.
    """
    scale, shift = norm_scale_and_shift(norm, kind, dense)
    weight = torch.diag(scale)
    if mean_axis:
        weight = reflect(reflect(weight, 0), 1)
        shift = None if shift is None else reflect(shift, -1)
    module = NormThenMap(dense, eps, dense, dense, bias=shift is not None, device=like.device, dtype=like.dtype,
                         skip_first=mean_axis)
    module.map.weight.copy_(weight.to(like.dtype))
    if shift is not None:
        module.map.bias.copy_(shift.to(like.dtype))
    return module


def has_mean_axis(model: nn.Module, family: Family) -> bool:
    """Whether the fused model keeps the mean direction as coordinate 0 (see `uses_mean_axis`)."""
    final = get_module(model, family.final_norm)
    return isinstance(final, NormThenMap) and final.norm.skip_first


def norm_eps(model: nn.Module, family: Family) -> float:
    final = get_module(model, family.final_norm)
    eps = norm_module_eps(final.norm if isinstance(final, NormThenMap) else final)
    if eps is None:
        raise SliceGPTError(f"cannot find the epsilon of norm '{family.final_norm}'")
    return eps


@torch.no_grad()
def fuse_embeddings(model: nn.Module, family: Family, tied: bool) -> None:
    """Untie the head unless `tied` (see `keep_head_tied`); LayerNorm models' embeddings are
    centred (untied) or move into the mean-axis basis (tied)."""
    if not tied:
        untie_head(model, family)
    if family.norm_kind == "layer":
        for path in family.embeddings:
            (reflect_embedding if tied else centre_embedding)(get_module(model, path))


def _fold(root: nn.Module, family: Family, norm_path: str, reader_paths, dense: int, eps: float,
          mean_axis: bool) -> list[str]:
    """Fold one norm into the linears that read it; returns the readers that gained a bias."""
    scale, shift = norm_scale_and_shift(get_module(root, norm_path), family.norm_kind, dense)
    readers = [stream_weight(root, p) for p in reader_paths]
    set_module(root, norm_path, SlicedRMSNorm(dense, eps, skip_first=mean_axis))
    return [reader_paths[i] for i in fold_into_linears(scale, shift, readers, mean_axis)]


def branch_scale(layer: nn.Module, attr: str) -> float:
    value = getattr(layer, attr, None)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SliceGPTError(f"the decoder layer has no scalar '{attr}' (got {value!r})")
    return float(value)


@torch.no_grad()
def scale_writers(layer: nn.Module, family: Family, scale: float) -> None:
    """x + scale * branch(x) == x + branch'(x): the scale moves into every writer's weight and bias
    (Granite's residual_multiplier); the sliced layer then adds the branch unscaled."""
    for path in (*family.writers("attn"), *family.writers("mlp")):
        writer = stream_weight(layer, path)
        bias = writer.bias
        writer.replace(writer.weight.double() * scale, None if bias is None else bias.double() * scale)


@torch.no_grad()
def fuse_layer(layer: nn.Module, family: Family, dense: int, eps: float,
               mean_axis: bool = False) -> tuple[SlicedDecoderLayer, list[str]]:
    """Fold one decoder layer's norms into its linears; returns it wrapped for shortcuts,
    and the paths (inside the layer) of the linears that gained a bias. `mean_axis`: see
    `uses_mean_axis`."""
    linearise_conv1d(layer, family.to_dict())
    if not family.pre_norms:  # the branches read the stream as it is
        gained = []
        set_module(layer, family.attn_norm, nn.Identity())
        set_module(layer, family.mlp_norm, nn.Identity())
    elif family.mlp_norm is None:  # one norm feeds both branches
        gained = _fold(layer, family, family.attn_norm, (*family.attn_inputs, *family.mlp_inputs), dense, eps,
                       mean_axis)
    else:
        gained = _fold(layer, family, family.attn_norm, family.attn_inputs, dense, eps, mean_axis)
        gained += _fold(layer, family, family.mlp_norm, family.mlp_inputs, dense, eps, mean_axis)
    for post in filter(None, (family.attn_post_norm, family.mlp_post_norm)):
        norm = get_module(layer, post)
        if norm_module_eps(norm) != eps:
            raise SliceGPTError(f"norm '{post}' has epsilon {norm_module_eps(norm)}, the final norm {eps}: "
                                "one epsilon for every norm is assumed")
        like = next(norm.parameters(), None)
        like = like if like is not None else stream_weight(layer, family.attn_inputs[0]).weight
        set_module(layer, post, final_map(norm, family.norm_kind, dense, eps, like=like))
    if family.branch_scale_attr is not None:
        scale_writers(layer, family, branch_scale(layer, family.branch_scale_attr))
    if family.norm_kind == "layer":
        for path in (*family.writers("attn"), *family.writers("mlp")):
            (reflect_output if mean_axis else centre_output)(stream_weight(layer, path))
    return wrap_layer(layer, family.to_dict()), gained


@torch.no_grad()
def fuse_head(model: nn.Module, family: Family, tied: bool, dense: int, eps: float,
              like: torch.Tensor | None = None) -> list[str]:
    """Fold the final norm into the head, or (tied head) into a map after the norm.

    The map takes the dtype and device of `like` (default: the head's weight).
    """
    if not tied:
        return _fold(model, family, family.final_norm, (family.head,), dense, eps, mean_axis=False)
    like = get_module(model, family.head).weight if like is None else like
    set_module(model, family.final_norm, final_map(get_module(model, family.final_norm), family.norm_kind, dense,
                                                   eps, like=like, mean_axis=uses_mean_axis(family, tied)))
    return []


def keep_head_tied(model: nn.Module, family: Family, keep_tied: bool) -> bool:
    return keep_tied and can_keep_tied(model, family)


@torch.no_grad()
def fuse(model: nn.Module, family: Family, keep_tied: bool = True) -> list[str]:
    """Fold all norms into their readers and wrap layers so shortcuts can be added.

    The model computes the same logits as before (up to float rounding). A tied head
    stays tied where `keep_tied` and the family allow it (see `NormThenMap`). Returns the
    paths of the linears that gained a bias (the sliced model must be rebuilt with one).
    Streaming runs call the three steps themselves, one layer at a time.
    """
    tied = keep_head_tied(model, family, keep_tied)
    dense, eps = model.config.hidden_size, norm_eps(model, family)
    fuse_embeddings(model, family, tied)
    gained: list[str] = []
    layers = get_module(model, family.layers)
    for index, layer in enumerate(layers):
        layers[index], added = fuse_layer(layer, family.for_layer(index), dense, eps, uses_mean_axis(family, tied))
        gained += [f"{family.layers}.{index}.{path}" for path in added]
    return gained + fuse_head(model, family, tied, dense, eps)
