"""Where a slicing run's weights and activations live while the driver works layer by layer.

The driver (driver.py) reaches the model only through a store, so one driver serves every
placement. `ResidentStore` holds a whole model in memory and fuses it once; the streamed
store (streamed_store.py) reads each layer from safetensors shards, fuses it, writes it
out once sliced and checkpoints after every layer. What a store does at each boundary:

    open()                      the embeddings (and, resident, everything) readable and fused
    capture(batches)            the first layer's inputs, and every layer's keyword arguments
    copy(acts, name, fn)        a second activation stream, fn applied to every batch
    close_embeddings(write)     the embeddings are rotated: write them out (streamed)
    layer(i) / close_layer(i)   a fused layer to rotate in place / it is sliced: write it out
    dense_layers(description)   every fused, unrotated layer in turn, for passes that only read
    head_map()                  what a tied head reads, as a module on the last stream
    close_head(rotate)          fuse the head, rotate it, write it out
    keep_basis / basis          a basis kept for later (resident: the tensor; streamed: a file)
    resume() / checkpoint()     the recorded state of an interrupted run / record progress
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from slicegpt.architectures.family import Family, get_module
from slicegpt.config import SliceConfig
from slicegpt.method.activations import Activations
from slicegpt.method.fusion import fuse, keep_head_tied, norm_eps, uses_mean_axis
from slicegpt.method.slicing import capture_layer_inputs


class ResidentStore:
    """A model held whole in memory (the `slice_model` API): nothing to read, write or resume."""

    def __init__(self, model: nn.Module, family: Family, config: SliceConfig, progress: bool = True):
        self.model, self.family, self.progress = model, family, progress
        self.device = next(model.parameters()).device
        self.tied = keep_head_tied(model, family, config.tied_head)
        self.mean_axis = uses_mean_axis(family, self.tied)
        self.dense = model.config.hidden_size
        self.layer_count = len(get_module(model, family.layers))
        self.added_biases: list[str] = []
        self.eps = 0.0
        self._bases: dict[str, torch.Tensor] = {}
        self.opened = False

    def open(self) -> None:
        """Fuse the model (once: a caller may open the store first to look at the fused model)."""
        if self.opened:
            return
        self.added_biases = fuse(self.model, self.family, keep_tied=self.tied)
        self.eps = norm_eps(self.model, self.family)
        self.opened = True

    def resume(self) -> dict | None:
        return None

    def capture(self, batches: list[dict], keep_hidden: bool = True) -> tuple[Activations, list[list[dict]]]:
        return capture_layer_inputs(self.model, self.family, batches)

    def copy(self, acts: Activations, name: str, fn: Callable | None = None) -> Activations:
        """Another stream; without `fn` it shares the batches (`map` replaces them, never edits them)."""
        return Activations([x if fn is None else fn(x) for x in acts.hidden], acts.masks)

    def close_embeddings(self, write: bool = True) -> None:
        pass

    def layer(self, index: int) -> nn.Module:
        return get_module(self.model, self.family.layers)[index]

    def close_layer(self, index: int, layer: nn.Module) -> None:
        pass

    def dense_layers(self, description: str) -> Iterator[tuple[int, nn.Module]]:
        layers = get_module(self.model, self.family.layers)
        for index in tqdm(range(self.layer_count), desc=description, unit="layer", disable=not self.progress):
            yield index, layers[index]

    def head_map(self) -> nn.Module:
        return get_module(self.model, self.family.final_norm)  # fusion made it a NormThenMap

    def close_head(self, rotate: Callable[[], None]) -> None:
        rotate()

    def keep_basis(self, Q: torch.Tensor, tag: str) -> str:
        self._bases[tag] = Q
        return tag

    def basis(self, handle: str) -> torch.Tensor:
        return self._bases[handle]

    def barrier(self) -> None:
        pass

    def checkpoint(self, next_layer: int, record: Callable[[], dict], streams: dict) -> None:
        pass

    def restore(self, state: dict, masks: list) -> dict:
        raise AssertionError("a resident run never resumes")
