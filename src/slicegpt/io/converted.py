"""Read a checkpoint by the model's own parameter names, as `from_pretrained` maps them.

Checkpoints on the hub often store tensors under other names than the model's modules,
or split differently: Mixtral keeps `block_sparse_moe.experts.N.w1/w2/w3`, Qwen-MoE one
tensor per expert, where the model holds fused `mlp.experts.gate_up_proj` tensors.
transformers converts them only while it loads a model, with a list of transforms per
model class (`conversion_mapping.get_model_conversion_mapping`). This module asks
transformers for that list and applies it to the checkpoint's key names up front (no
tensor is read), so it knows which source tensors feed each parameter. Reading a
parameter then reads just those tensors and runs transformers' own conversion on them:
reading one decoder layer touches only that layer's tensors.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from slicegpt.errors import SliceGPTError
from slicegpt.io.shards import SafetensorsCheckpoint


@dataclass
class _Source:
    """The checkpoint tensors behind one parameter (or one group a converter produces together)."""

    converter: object | None  # a transformers WeightConverter, or None for a plain (renamed) tensor
    keys: list[tuple[str, str]] = field(default_factory=list)  # (source pattern, checkpoint key), in load order
    produces: tuple[str, ...] = ()  # the parameter names the conversion yields


class ConvertedCheckpoint:
    """The tensors of `checkpoint` by `model`'s parameter and buffer names."""

    def __init__(self, checkpoint: SafetensorsCheckpoint, model: nn.Module):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

        self.checkpoint, self.model = checkpoint, model
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
        wanted = model.state_dict()  # meta tensors: only the names matter
        prefix = model.base_model_prefix
        self.sources: dict[str, _Source] = {}  # the first parameter a group produces -> its sources
        self.group_of: dict[str, str] = {}  # every parameter name -> the key of its group in `sources`
        # The order `from_pretrained` collects tensors in: it decides the order experts are stacked.
        for key in sorted(checkpoint.weight_map, key=dot_natural_key):
            name, pattern = rename_source_key(key, renamings, converters, prefix, wanted)
            if name not in wanted and key in wanted:  # (as transformers: keep a key that already fits)
                name, pattern = rename_source_key(key, [], [], prefix, wanted)
            if name not in wanted:
                continue  # a tensor the model does not hold
            if pattern is None:  # a plain tensor, perhaps renamed; the first key for a name wins, as in transformers
                self.sources.setdefault(name, _Source(None, [(key, key)], (name,)))
            else:
                converter = by_pattern[pattern]
                first = converter.target_patterns[0]
                produces = tuple(name.replace(first, target, 1) for target in converter.target_patterns)
                self.sources.setdefault(name, _Source(converter, produces=produces)).keys.append((pattern, key))
        for first, source in self.sources.items():
            for name in source.produces:
                self.group_of[name] = first

    def __contains__(self, name: str) -> bool:
        return name in self.group_of

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named parameters, each from just the checkpoint tensors that feed it."""
        missing = [name for name in names if name not in self]
        if missing:
            raise SliceGPTError(f"{self.checkpoint.directory}: the checkpoint has no tensor for "
                                f"{missing[0]} (nor any that transformers converts into it)")
        groups = {self.group_of[name] for name in names}
        tensors = self.checkpoint.read(sorted({key for g in groups for _, key in self.sources[g].keys}))
        found: dict[str, torch.Tensor] = {}
        for group in groups:
            found.update(self._convert(group, tensors))
        return {name: found[name] for name in names}

    def _convert(self, group: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        source = self.sources[group]
        if source.converter is None:
            _, key = source.keys[0]
            return {group: tensors[key]}
        converter = copy.deepcopy(source.converter)  # it collects tensors: one fresh copy per group
        for pattern, key in source.keys:
            converter.add_tensor(group, key, pattern, tensors[key])
        converted = converter.convert(group, model=self.model, config=self.model.config)
        return {name: value[0] if isinstance(value, list) else value for name, value in converted.items()}
