"""Rotations shared across layers, from one pass over the fused dense model.

Every point where a block reads the stream is the input of a norm, so hooks on the
norms collect each point's covariance in one forward. Points in a group share one
basis (the PCA of their summed, trace-normalised covariances), and no shortcut is
needed between blocks that share a basis. With one group for the whole model there
are no shortcuts at all.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import SliceGPTError
from .families import Family, get_module
from .modeling_sliced import NormThenMap, set_width_attrs, stream_weight
from .pca import CovarianceAccumulator, principal_basis
from .rotation import rotate_input, rotate_output, shortcut
from .slicing import SliceResult, StreamPoint, WidthRule, layer_record, rotate_head


def stream_points(family: Family, layers: int) -> list[str]:
    """The points in stream order; a layer's output is the next layer's input."""
    names = ["embeddings"]
    for index in range(layers):
        if family.mlp_norm is not None and not family.parallel:
            names.append(f"layer {index} mlp input")
        names.append(f"layer {index} output")
    return names


HEAD_INPUT = "head input"


def _norm_hooks(model: nn.Module, family: Family) -> list[tuple[nn.Module, str]]:
    layers = get_module(model, family.layers)
    hooks = []
    for index, layer in enumerate(layers):
        before = "embeddings" if index == 0 else f"layer {index - 1} output"
        hooks.append((get_module(layer, family.attn_norm), before))
        if family.mlp_norm is not None and not family.parallel:
            hooks.append((get_module(layer, family.mlp_norm), f"layer {index} mlp input"))
    final = get_module(model, family.final_norm)
    hooks.append((final.norm if isinstance(final, NormThenMap) else final, f"layer {len(layers) - 1} output"))
    return hooks


@torch.no_grad()
def collect_covariances(model: nn.Module, family: Family, batches: list[dict], progress: bool = True,
                        normalize: bool = False, head_only: bool = False) -> dict[str, CovarianceAccumulator]:
    """Each stream point's covariance on the fused model, from one forward of the body
    (with `head_only`, just a tied head's input)."""
    dense = model.config.hidden_size
    device = next(model.parameters()).device
    accumulators: dict[str, CovarianceAccumulator] = {}
    current = {}
    handles = []
    for module, name in ([] if head_only else _norm_hooks(model, family)):
        accumulators.setdefault(name, CovarianceAccumulator(dense, where=f"at {name}", device=device,
                                                                normalize=normalize))

        def hook(module, args, name=name):
            accumulators[name].add(args[0], current["mask"])

        handles.append(module.register_forward_pre_hook(hook))
    final = get_module(model, family.final_norm)
    if isinstance(final, NormThenMap):  # a tied head reads the map's output, in the embedding basis
        accumulators[HEAD_INPUT] = CovarianceAccumulator(dense, where="at the head", device=device)

        def head_hook(module, args, output):
            accumulators[HEAD_INPUT].add(output, current["mask"])

        handles.append(final.register_forward_hook(head_hook))
    try:
        for batch in tqdm(batches, desc="Collecting covariances", unit="batch", disable=not progress):
            current["mask"] = batch.get("attention_mask")
            model.base_model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                             use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    for accumulator in accumulators.values():
        accumulator.all_reduce()
    return accumulators


def group_points(names: list[str], layers: int, group_size: int | None) -> list[list[str]]:
    """Groups of `group_size` consecutive layers (all points of a layer), or one group."""
    if group_size is None or group_size >= layers:
        return [names]
    groups: dict[int, list[str]] = {}
    for name in names:
        index = 0 if name == "embeddings" else int(name.split()[1])
        groups.setdefault(index // group_size, []).append(name)
    return list(groups.values())


@torch.no_grad()
def rotate_shared(model: nn.Module, family: Family, batches: list[dict], width_rule: WidthRule,
                  group_size: int | None = None, progress: bool = True, normalize_pca: bool = False,
                  joint_head: bool = True) -> SliceResult:
    """Rotate and slice a fused model with one basis per group of layers."""
    layers = get_module(model, family.layers)
    names = stream_points(family, len(layers))
    covariances = collect_covariances(model, family, batches, progress, normalize=normalize_pca)
    result = SliceResult()
    bases: dict[str, torch.Tensor] = {}
    for group in group_points(names, len(layers), group_size):
        # Normalise each point by its trace, so the late layers' larger stream does not dominate.
        # A tied head reads the embedding basis, so its input counts where the embeddings do.
        joint = "embeddings" in group and HEAD_INPUT in covariances and joint_head
        members = group + ([HEAD_INPUT] if joint else [])
        total = sum(covariances[n].sum / covariances[n].sum.trace() for n in members)
        eigenvalues, vectors = principal_basis(total)
        width = width_rule(group[0], eigenvalues)
        basis = vectors[:, :width]
        for name in group:
            bases[name] = basis
            result.points.append(StreamPoint(name, eigenvalues.tolist(), width))

    for path in family.embeddings:
        rotate_input(stream_weight(model, path), bases["embeddings"])
    result.embedding_width = bases["embeddings"].shape[1]
    Q_in = bases["embeddings"]
    for index, layer in enumerate(layers):
        dtype = stream_weight(layer, family.attn_outputs[0]).weight.dtype
        Q_out = bases[f"layer {index} output"]
        Q_mid = Q_in if layer.parallel else bases[f"layer {index} mlp input"]
        attn_to = Q_out if layer.parallel else Q_mid
        if family.mlp_keeps_width and Q_mid.shape[1] != Q_out.shape[1]:
            raise SliceGPTError(f"{family.name} needs the same width before and after its MLP")
        for path in family.attn_inputs:
            rotate_input(stream_weight(layer, path), Q_in)
        for path in family.mlp_inputs:
            rotate_input(stream_weight(layer, path), Q_mid)
        for path in family.attn_outputs:
            rotate_output(stream_weight(layer, path), attn_to)
        for path in family.mlp_outputs:
            rotate_output(stream_weight(layer, path), Q_out)
        set_width_attrs(layer, family.mlp_width_attrs, Q_mid.shape[1])
        layer.attn_shortcut = None if attn_to is Q_in else shortcut(Q_in, attn_to, dtype)
        if not layer.parallel:
            layer.mlp_shortcut = None if Q_out is Q_mid else shortcut(Q_mid, Q_out, dtype)
        result.layer_widths.append(layer_record(layer, Q_in, Q_out, None if layer.parallel else Q_mid))
        Q_in = Q_out
    rotate_head(model, family, Q_in, bases["embeddings"])
    result.head_in = Q_in.shape[1]
    return result
