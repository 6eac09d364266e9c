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
    """Parameters of the LM head that are not shared with the embeddings."""
    head = get_module(model, family.head)
    embedding_ptrs = {get_module(model, p).weight.data_ptr() for p in family.embeddings}
    return sum(p.numel() for p in head.parameters() if p.data_ptr() not in embedding_ptrs)


def versions() -> dict:
    found = {"python": platform.python_version()}
    for package in ("slicegpt", "torch", "transformers", "safetensors", "datasets", "accelerate", "lm_eval", "peft"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found
