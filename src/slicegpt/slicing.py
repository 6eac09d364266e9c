"""Calibrate, rotate and slice a fused model, one decoder layer at a time.

Each layer's calibration activations pass through it once: the attention half runs,
its output is the stream the MLP reads, so its PCA fixes the rotation between the two
halves; then the MLP half runs and its output's PCA fixes the basis the next layer
reads. Each later layer sees (and corrects for) the error of the earlier sliced ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .families import Family, get_module
from .modeling_sliced import SlicedDecoderLayer
from .pca import CovarianceAccumulator, principal_basis
from .rotation import change_basis, rotate_embedding, rotate_input, rotate_output, shortcut


class _StopForward(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for a decoder layer to record the arguments the model passes it."""

    def __init__(self, store: list, last: bool):
        super().__init__()
        self.store, self.last = store, last

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise TypeError("decoder layers are expected to take keyword arguments after hidden_states")
        self.store.append((hidden_states, kwargs))
        if self.last:
            raise _StopForward
        return hidden_states


@dataclass
class Activations:
    """Calibration activations at one point of the stream, batch by batch."""

    hidden: list[torch.Tensor]
    masks: list[torch.Tensor | None]

    def map(self, fn: Callable[..., torch.Tensor], *per_batch: list) -> None:
        """Replace each batch by fn(batch, *its extras), one batch at a time.

        Done in place, so each old batch is freed as its successor is made (at most one
        batch is held twice); streaming runs swap in a subclass that keeps batches on disk.
        """
        for index, extras in enumerate(zip(*per_batch) if per_batch else [()] * len(self.hidden)):
            self.hidden[index] = fn(self.hidden[index], *extras)


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, family: Family, batches: list[dict]) -> tuple[Activations, list[list[dict]]]:
    """Inputs to the first layer, and the keyword arguments each layer receives, per batch.

    The model runs its own embedding, position and mask code; the layers are replaced by
    recorders for the duration, so nothing past the embeddings is computed.
    """
    layers = get_module(model, family.layers)
    originals = list(layers)
    stores: list[list] = [[] for _ in originals]
    for index in range(len(originals)):
        layers[index] = _Recorder(stores[index], last=index == len(originals) - 1)
    hidden, masks = [], []
    try:
        for batch in batches:
            try:
                model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
            except _StopForward:
                pass
            hidden.append(stores[0][-1][0])
            masks.append(batch.get("attention_mask"))
    finally:
        for index, layer in enumerate(originals):
            layers[index] = layer
    layer_kwargs = [[kwargs for _, kwargs in store] for store in stores]
    return Activations(hidden, masks), layer_kwargs


@dataclass
class StreamPoint:
    """One place where a block reads the stream: its name, PCA spectrum and kept width."""

    name: str
    eigenvalues: list[float]
    width: int

    @property
    def variance_kept(self) -> float:
        total = sum(self.eigenvalues)
        return sum(self.eigenvalues[: self.width]) / total if total > 0 else 1.0


@dataclass
class SliceResult:
    points: list[StreamPoint] = field(default_factory=list)
    layer_widths: list[dict] = field(default_factory=list)
    embedding_width: int = 0
    head_in: int = 0


WidthRule = Callable[[str, torch.Tensor], int]


def _principal(acts: Activations, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    dim = acts.hidden[0].shape[-1]
    acc = CovarianceAccumulator(dim, where=where, device=acts.hidden[0].device)
    for x, mask in zip(acts.hidden, acts.masks):
        acc.add(x, mask)
    acc.all_reduce()
    return principal_basis(acc.sum)


def _identity(dim: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(dim, dtype=torch.float64, device=like.device)


class Slicer:
    """Runs the layer-by-layer rotation; `width_rule` picks each point's kept width."""

    def __init__(self, model: nn.Module, family: Family, width_rule: WidthRule, progress: bool = True):
        self.model, self.family, self.width_rule, self.progress = model, family, width_rule, progress
        self.dense = model.config.hidden_size
        self.result = SliceResult()

    def _basis(self, acts: Activations, name: str) -> torch.Tensor:
        eigenvalues, vectors = _principal(acts, where=f"at {name}")
        width = self.width_rule(name, eigenvalues)
        self.result.points.append(StreamPoint(name, eigenvalues.tolist(), width))
        return vectors[:, :width]

    @torch.no_grad()
    def run(self, batches: list[dict]) -> SliceResult:
        acts, layer_kwargs = capture_layer_inputs(self.model, self.family, batches)
        Q = self.slice_embeddings(acts)
        layers = get_module(self.model, self.family.layers)
        for index in tqdm(range(len(layers)), desc="Slicing layers", unit="layer", disable=not self.progress):
            Q = self.slice_layer(index, layers[index], acts, layer_kwargs[index], Q)
        self.slice_head(Q)
        return self.result

    @torch.no_grad()
    def slice_embeddings(self, acts: Activations) -> torch.Tensor:
        """Rotate the embeddings into the PCA basis of the first layer's input; returns that basis."""
        Q = self._basis(acts, "embeddings")
        for path in self.family.embeddings:
            rotate_embedding(get_module(self.model, path), Q)
        acts.map(lambda x: change_basis(x, Q))
        self.result.embedding_width = Q.shape[1]
        return Q

    @torch.no_grad()
    def slice_layer(self, index: int, layer: SlicedDecoderLayer, acts: Activations, kwargs: list[dict],
                    Q_in: torch.Tensor) -> torch.Tensor:
        """Rotate and slice one fused layer; `acts` become its outputs, in the returned basis."""
        if not isinstance(layer, SlicedDecoderLayer):
            raise TypeError("fuse the model before slicing it")
        slice_one = self._parallel_layer if layer.parallel else self._sequential_layer
        return slice_one(index, layer, acts, kwargs, Q_in)

    @torch.no_grad()
    def slice_head(self, Q: torch.Tensor) -> None:
        rotate_input(get_module(self.model, self.family.head), Q)
        self.result.head_in = Q.shape[1]

    def _sequential_layer(self, index: int, layer: SlicedDecoderLayer, acts: Activations,
                          kwargs: list[dict], Q_in: torch.Tensor) -> torch.Tensor:
        family, dtype = self.family, acts.hidden[0].dtype
        for path in family.attn_inputs:
            rotate_input(get_module(layer, path), Q_in)
        # Until the next basis is known, the skip path returns to the dense basis.
        layer.attn_shortcut = shortcut(Q_in, _identity(self.dense, Q_in), dtype)
        acts.map(lambda x, kw: layer.attention_half(x, **kw), kwargs)
        Q_mid = self._basis(acts, f"layer {index} mlp input")
        rotate_output(get_module(layer, family.attn_output), Q_mid)
        layer.attn_shortcut = shortcut(Q_in, Q_mid, dtype)
        acts.map(lambda x: change_basis(x, Q_mid))

        for path in family.mlp_inputs:
            rotate_input(get_module(layer, path), Q_mid)
        layer.mlp_shortcut = shortcut(Q_mid, _identity(self.dense, Q_mid), dtype)
        acts.map(layer.mlp_half)
        Q_out = self._basis(acts, f"layer {index} output")
        rotate_output(get_module(layer, family.mlp_output), Q_out)
        layer.mlp_shortcut = shortcut(Q_mid, Q_out, dtype)
        acts.map(lambda x: change_basis(x, Q_out))
        self.result.layer_widths.append({"in": Q_in.shape[1], "mid": Q_mid.shape[1], "out": Q_out.shape[1]})
        return Q_out

    def _parallel_layer(self, index: int, layer: SlicedDecoderLayer, acts: Activations,
                        kwargs: list[dict], Q_in: torch.Tensor) -> torch.Tensor:
        family, dtype = self.family, acts.hidden[0].dtype
        for path in (*family.attn_inputs, *family.mlp_inputs):
            rotate_input(get_module(layer, path), Q_in)
        layer.attn_shortcut = shortcut(Q_in, _identity(self.dense, Q_in), dtype)
        acts.map(lambda x, kw: layer.parallel_block(x, **kw), kwargs)
        Q_out = self._basis(acts, f"layer {index} output")
        rotate_output(get_module(layer, family.attn_output), Q_out)
        rotate_output(get_module(layer, family.mlp_output), Q_out)
        layer.attn_shortcut = shortcut(Q_in, Q_out, dtype)
        acts.map(lambda x: change_basis(x, Q_out))
        self.result.layer_widths.append({"in": Q_in.shape[1], "out": Q_out.shape[1]})
        return Q_out


def constant_width(width: int) -> WidthRule:
    return lambda name, eigenvalues: min(width, eigenvalues.shape[0])


def slicing_metadata(model: nn.Module, family: Family, result: SliceResult, eps: float) -> dict:
    """What the sliced modeling code needs to rebuild the model's shape (goes into config.json)."""
    return {
        "format_version": 1,
        "base_architecture": type(model).__name__,
        "family": family.to_dict(),
        "dense_hidden_size": model.config.hidden_size,
        "norm_eps": eps,
        "embedding_width": result.embedding_width,
        "layers": result.layer_widths,
        "head_in": result.head_in,
    }
