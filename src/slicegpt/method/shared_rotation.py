"""Rotations shared across layers: stream points, their groups, and one layer's rotation.

Points in a group share one basis (the PCA of their summed, trace-normalised
covariances, collected in one pass over the fused dense model), and no shortcut is
needed between blocks that share a basis. With one group for the whole model there
are no shortcuts at all. The driver (running/driver.py) runs the two passes.
"""

from __future__ import annotations

import torch
from torch import nn

from slicegpt.architectures.family import Family
from slicegpt.architectures.modeling_sliced import set_width_attrs, stream_weight
from slicegpt.errors import SliceGPTError
from slicegpt.method.pca import principal_basis
from slicegpt.method.points import EMBEDDINGS, HEAD_INPUT, layer_input, layer_of, layer_output, mlp_input
from slicegpt.method.rotation import rotate_input, rotate_output, shortcut
from slicegpt.method.slicing import StreamPoint, WidthRule, layer_record


def group_points(names: list[str], layers: int, group_size: int | None) -> list[list[str]]:
    """Groups of `group_size` consecutive layers (all points of a layer), or one group."""
    if group_size is None or group_size >= layers:
        return [names]
    groups: dict[int, list[str]] = {}
    for name in names:
        groups.setdefault(layer_of(name) // group_size, []).append(name)
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
            self.group_of[HEAD_INPUT] = self.group_of[EMBEDDINGS]
            self.waiting[self.group_of[EMBEDDINGS]] += 1
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


@torch.no_grad()
def rotate_layer(layer: nn.Module, family: Family, index: int, bases: dict[str, torch.Tensor]) -> dict:
    """Rotate and slice one fused layer into the bases of its points; returns its width record.

    Points of one group share the same tensor, and no shortcut is made between them.
    """
    family = family.for_layer(index)
    dtype = stream_weight(layer, family.attn_inputs[0]).weight.dtype
    Q_in = bases[layer_input(index)]
    Q_out = bases[layer_output(index)]
    Q_mid = Q_in if layer.parallel else bases[mlp_input(index)]
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
