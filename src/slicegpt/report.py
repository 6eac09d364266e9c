"""Honest accounting: real parameter counts and library versions."""

from __future__ import annotations

import importlib.metadata
import platform

from torch import nn

from .families import Family, get_module


def count_parameters(model: nn.Module) -> int:
    """Every parameter, tied tensors counted once."""
    seen, total = set(), 0
    for param in model.parameters():
        if param.data_ptr() in seen:
            continue
        seen.add(param.data_ptr())
        total += param.numel()
    return total


def shortcut_parameters(model: nn.Module) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if "_shortcut." in name)


def head_parameters(model: nn.Module, family: Family) -> int:
    """What the output side costs beyond the embeddings: an untied head, or the final map."""
    head = get_module(model, family.head)
    embedding_ptrs = {get_module(model, p).weight.data_ptr() for p in family.embeddings}
    own = sum(p.numel() for p in head.parameters() if p.data_ptr() not in embedding_ptrs)
    final_map = getattr(get_module(model, family.final_norm), "map", None)
    return own + (sum(p.numel() for p in final_map.parameters()) if final_map is not None else 0)


def versions() -> dict:
    found = {"python": platform.python_version()}
    for package in ("slicegpt", "torch", "transformers", "safetensors", "datasets", "accelerate", "lm_eval", "peft"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found
