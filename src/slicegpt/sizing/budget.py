"""Size-aware slicing: the width that meets a real parameter budget.

Counts come from building the sliced shape on the meta device with the same modeling
code that loads checkpoints, so every parameter is counted and nothing is estimated.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from slicegpt.config import SliceConfig
from slicegpt.errors import SliceGPTError
from slicegpt.architectures.family import Family, get_module
from slicegpt.method.fusion import can_keep_tied, uses_mean_axis
from slicegpt.architectures.modeling_sliced import sliced_class_for, stream_weight
from slicegpt.sizing.counts import count_parameters
from slicegpt.method.points import EMBEDDINGS, layer_input, layer_output, mlp_input, stream_points
from slicegpt.method.shared_rotation import group_points


def basis_owner(config: SliceConfig, names: list[str], layers: int) -> dict[str, str]:
    """For each stream point, the point whose basis it uses (equal owners: no shortcut between)."""
    if config.widths == "embedding":  # every later point keeps the dense coordinates
        return {name: name if name == EMBEDDINGS else "dense" for name in names}
    if config.rotations == "block":
        return {name: name for name in names}
    return {name: group[0] for group in group_points(names, layers, config.group_size) for name in group}


def sizing_facts(model: nn.Module, family: Family, config: SliceConfig) -> dict:
    """What a sliced model's size depends on besides its widths, read off the model before
    fusion (which unties, folds norms and adds biases) or streaming (which unties on read)."""
    tied = config.tied_head and can_keep_tied(model, family)
    return {
        "tied_head": tied,
        "final_map_bias": tied and _has_shift(model, family.final_norm),
        "mean_axis": uses_mean_axis(family, tied),
        "added_biases": biases_to_gain(model, family, tied),
    }


def planned_slicing(model: nn.Module, family: Family, config: SliceConfig, widths: dict[str, int],
                    facts: dict | None = None) -> dict:
    """The `config.slicing` record a run with these per-point widths would produce; `facts`
    (`sizing_facts`) where the model is no longer as it was before fusion."""
    layers = len(get_module(model, family.layers))
    names = stream_points(family, layers)
    owner = basis_owner(config, names, layers)
    records = []
    for index in range(layers):
        before, after = layer_input(index), layer_output(index)
        middle = after if family.parallel else mlp_input(index)
        record = {"in": widths[before]}
        if not family.parallel:
            record["mid"] = widths[middle]
        record["out"] = widths[after]
        absent = [part for part, (a, b) in (("attn", (before, middle)), ("mlp", (middle, after)))
                  if owner[a] == owner[b] and not (part == "mlp" and family.parallel)]
        if absent:
            record["no_shortcut"] = absent
        scaled = [part for part, point in (("attn", middle), ("mlp", after))
                  if getattr(family, f"{part}_post_norm") and owner[point] == "dense"]
        if scaled:
            record["post_norm_scales"] = scaled
        records.append(record)
    return {
        "family": family.to_dict(),
        "base_architecture": type(model).__name__,
        "dense_hidden_size": model.config.hidden_size,
        "norm_eps": 1e-6,  # irrelevant to the count
        "embedding_width": widths[EMBEDDINGS],
        "layers": records,
        "head_in": widths[layer_output(layers - 1)],
        **(facts or sizing_facts(model, family, config)),
    }


def _has_shift(root: nn.Module, norm_path: str) -> bool:
    return getattr(get_module(root, norm_path), "bias", None) is not None


def biases_to_gain(model: nn.Module, family: Family, tied: bool) -> list[str]:
    """The linears that fusion will give a bias: bias-free readers of a LayerNorm with a shift."""
    if family.norm_kind != "layer":
        return []
    gained = []
    norms = ([(family.attn_norm, (*family.attn_inputs, *family.mlp_inputs))] if family.mlp_norm is None else
             [(family.attn_norm, family.attn_inputs), (family.mlp_norm, family.mlp_inputs)])
    for index, layer in enumerate(get_module(model, family.layers)):
        for norm, readers in norms:
            if _has_shift(layer, norm):
                gained += [f"{family.layers}.{index}.{path}" for path in readers
                           if stream_weight(layer, path).bias is None]
    if not tied and _has_shift(model, family.final_norm) and stream_weight(model, family.head).bias is None:
        gained.append(family.head)
    return gained


def predicted_parameters(model: nn.Module, family: Family, config: SliceConfig, widths: dict[str, int],
                         facts: dict | None = None) -> int:
    model_config = copy.deepcopy(model.config)
    model_config.slicing = planned_slicing(model, family, config, widths, facts)
    with torch.device("meta"):
        skeleton = sliced_class_for(type(model))(model_config)
    return count_parameters(skeleton)


def uniform_widths(model: nn.Module, family: Family, width: int, config: SliceConfig | None = None) -> dict[str, int]:
    """Every point at `width`; with `--widths embedding`, the embeddings only."""
    layers = len(get_module(model, family.layers))
    if config is not None and config.widths == "embedding":
        dense = model.config.hidden_size
        return {name: width if name == EMBEDDINGS else dense for name in stream_points(family, layers)}
    return {name: width for name in stream_points(family, layers)}


def width_for_budget(model: nn.Module, family: Family, config: SliceConfig, target: int) -> int:
    """The largest width (a multiple of round_to) whose sliced model has at most `target` parameters."""
    dense = model.config.hidden_size
    step = config.round_to
    low, high = 1, dense // step  # in units of `step`

    def fits(units: int) -> bool:
        return predicted_parameters(model, family, config, uniform_widths(model, family, units * step, config)) <= target

    if not fits(low):
        raise SliceGPTError(f"no width meets the budget of {target:,} parameters "
                            f"(even width {step} gives more)")
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low * step


def parameter_budget(model: nn.Module, family: Family, config: SliceConfig) -> int | None:
    """The real parameter count to meet, where the config asks for one (before fusion)."""
    if config.target_params is not None:
        return config.target_params
    if config.target_ratio is not None:
        return int(config.target_ratio * count_parameters(model))
    if config.widths == "variance":  # the same size as the uniform width at this sparsity
        return uniform_size(model, family, config)
    return None


def uniform_size(model: nn.Module, family: Family, config: SliceConfig) -> int:
    """The real size of one uniform width at the config's sparsity, in the config's layout."""
    width = config.kept_width(model.config.hidden_size)
    return predicted_parameters(model, family, config, uniform_widths(model, family, width, config))

