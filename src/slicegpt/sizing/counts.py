"""Honest accounting: real parameter counts, every parameter counted once."""

from __future__ import annotations

from torch import nn

from slicegpt.architectures.family import Family, get_module


def count_parameters(model: nn.Module) -> int:
    """Every parameter; `parameters()` yields a tied (shared) parameter once."""
    return sum(param.numel() for param in model.parameters())


def shortcut_parameters(model: nn.Module) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if "_shortcut." in name)


def head_parameters(model: nn.Module, family: Family) -> int:
    """What the output side costs beyond the embeddings: an untied head, or the final map."""
    head = get_module(model, family.head)
    embeddings = [get_module(model, p).weight for p in family.embeddings]
    own = sum(p.numel() for p in head.parameters() if not any(p is e for e in embeddings))
    final_map = getattr(get_module(model, family.final_norm), "map", None)
    return own + (sum(p.numel() for p in final_map.parameters()) if final_map is not None else 0)

