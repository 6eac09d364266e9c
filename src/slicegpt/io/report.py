"""What a run's report records beside its figures: the versions that produced them."""

from __future__ import annotations

import importlib.metadata
import platform


def versions() -> dict:
    found = {"python": platform.python_version()}
    for package in ("slicegpt", "torch", "transformers", "safetensors", "datasets", "accelerate", "lm_eval", "peft"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found
