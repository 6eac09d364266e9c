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

from slicegpt.errors import SliceGPTError
from slicegpt.architectures.families import Family, get_module
from slicegpt.architectures.modeling_sliced import NormThenMap, set_width_attrs, stream_weight
from slicegpt.method.fusion import has_mean_axis
from slicegpt.method.pca import CovarianceAccumulator, principal_basis
from slicegpt.method.refit import dense_copy, refit_layer
from slicegpt.method.rotation import change_basis, rotate_input, rotate_output, shortcut
from slicegpt.method.activations import Activations
from slicegpt.method.slicing import (Activations, SliceResult, StreamPoint, WidthRule, capture_layer_inputs, layer_record, 
                      rotate_head)


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


class GroupBases:
    """One basis per group of stream points, from covariances handed over point by point.

    A group's basis is the PCA of its points' covariances, each normalised by its trace so
    the late layers' larger stream does not dominate, then summed. A tied head reads the
    embedding basis, so with `joint_head` its input counts in the embeddings' group. Each
    group is decided as soon as its last point arrives, so a streaming run holds only the
    groups still open.
    """

    def __init__(self, names: list[str], layers: int, group_size: int | None, width_rule: WidthRule,
                 joint_head: bool, mean_axis: bool = False):
        self.names, self.width_rule, self.mean_axis = names, width_rule, mean_axis
        self.groups = group_points(names, layers, group_size)
        self.group_of = {name: g for g, group in enumerate(self.groups) for name in group}
        self.waiting = [len(group) for group in self.groups]
        if joint_head:
            self.group_of[HEAD_INPUT] = self.group_of["embeddings"]
            self.waiting[self.group_of["embeddings"]] += 1
        self.totals: dict[int, torch.Tensor] = {}
        self.points: dict[str, StreamPoint] = {}

    def add(self, name: str, covariance: torch.Tensor) -> tuple[list[str], torch.Tensor] | None:
        """Count one point's covariance; returns (the group's points, its basis) once the group is complete."""
        if name not in self.group_of:
            return None
        g = self.group_of[name]
        term = covariance / covariance.trace()
        self.totals[g] = term if g not in self.totals else self.totals[g] + term
        self.waiting[g] -= 1
        if self.waiting[g]:
            return None
        eigenvalues, vectors = principal_basis(self.totals.pop(g), keep_first=self.mean_axis)
        group = self.groups[g]
        width = self.width_rule(group[0], eigenvalues)
        for member in group:
            self.points[member] = StreamPoint(member, eigenvalues.tolist(), width)
        return group, vectors[:, :width]

    def stream_points(self) -> list[StreamPoint]:
        return [self.points[name] for name in self.names]


def basis_before(index: int) -> str:
    """The stream point a layer reads first."""
    return "embeddings" if index == 0 else f"layer {index - 1} output"


@torch.no_grad()
def rotate_layer(layer: nn.Module, family: Family, index: int, bases: dict[str, torch.Tensor]) -> dict:
    """Rotate and slice one fused layer into the bases of its points; returns its width record.

    Points of one group share the same tensor, and no shortcut is made between them.
    """
    family = family.for_layer(index)
    dtype = stream_weight(layer, family.attn_inputs[0]).weight.dtype
    Q_in = bases[basis_before(index)]
    Q_out = bases[f"layer {index} output"]
    Q_mid = Q_in if layer.parallel else bases[f"layer {index} mlp input"]
    attn_to = Q_out if layer.parallel else Q_mid
    if family.mlp_keeps_width and Q_mid.shape[1] != Q_out.shape[1]:
        raise SliceGPTError(f"{family.name} needs the same width before and after its MLP")
    for path in family.attn_inputs:
        rotate_input(stream_weight(layer, path), Q_in)
    for path in family.mlp_inputs:
        rotate_input(stream_weight(layer, path), Q_mid)
    for path in family.writers("attn"):
        rotate_output(stream_weight(layer, path), attn_to)
    for path in family.writers("mlp"):
        rotate_output(stream_weight(layer, path), Q_out)
    set_width_attrs(layer, family.mlp_width_attrs, Q_mid.shape[1])
    layer.attn_shortcut = None if attn_to is Q_in else shortcut(Q_in, attn_to, dtype)
    if not layer.parallel:
        layer.mlp_shortcut = None if Q_out is Q_mid else shortcut(Q_mid, Q_out, dtype)
    return layer_record(layer, Q_in, Q_out, None if layer.parallel else Q_mid)


@torch.no_grad()
def rotate_shared(model: nn.Module, family: Family, batches: list[dict], width_rule: WidthRule,
                  group_size: int | None = None, progress: bool = True, normalize_pca: bool = False,
                  joint_head: bool = True, refit: bool = False) -> SliceResult:
    """Rotate and slice a fused model with one basis per group of layers; with `refit`, refit
    each layer's output projections on the calibration batches as it is sliced (refit.py)."""
    layers = get_module(model, family.layers)
    names = stream_points(family, len(layers))
    covariances = collect_covariances(model, family, batches, progress, normalize=normalize_pca)
    grouping = GroupBases(names, len(layers), group_size, width_rule, joint_head and HEAD_INPUT in covariances,
                          mean_axis=has_mean_axis(model, family))
    bases: dict[str, torch.Tensor] = {}
    for name in [*names, HEAD_INPUT]:
        done = grouping.add(name, covariances[name].sum) if name in covariances else None
        if done:
            group, basis = done
            bases.update(dict.fromkeys(group, basis))
    result = SliceResult(points=grouping.stream_points())
    if refit:  # the dense stream (before the embeddings rotate) and the sliced one
        dense_acts, kwargs = capture_layer_inputs(model, family, batches)
        sliced_acts = Activations([change_basis(x, bases["embeddings"]) for x in dense_acts.hidden],
                                  dense_acts.masks)
    for path in family.embeddings:
        rotate_input(stream_weight(model, path), bases["embeddings"])
    result.embedding_width = bases["embeddings"].shape[1]
    for index, layer in enumerate(tqdm(layers, desc="Rotating and refitting layers", unit="layer",
                                       disable=not (progress and refit))):
        reference = dense_copy(layer) if refit else None
        result.layer_widths.append(rotate_layer(layer, family, index, bases))
        if refit:
            refit_layer(reference, layer, family.for_layer(index), dense_acts, sliced_acts, kwargs[index],
                        bases.get(f"layer {index} mlp input"), bases[f"layer {index} output"])
            del reference
    Q_last = bases[f"layer {len(layers) - 1} output"]
    rotate_head(model, family, Q_last, bases["embeddings"])
    result.head_in = Q_last.shape[1]
    return result
