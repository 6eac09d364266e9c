"""Covariances at the stream points of the fused dense model, collected layer by layer.

Layer by layer rather than in one model forward, so that the same code reads a resident
model and one streamed from disk: the first layer's inputs move through each fused layer
in turn, and each point's covariance is taken as the stream passes it. A tied head's
input (the final map's output) comes last.
"""

from __future__ import annotations

from typing import Callable

from slicegpt.architectures.family import get_module
from slicegpt.architectures.modeling_sliced import first_output
from slicegpt.method.importance import InputSquares, writer_paths
from slicegpt.method.pca import CovarianceAccumulator
from slicegpt.method.points import EMBEDDINGS, HEAD_INPUT, layer_output, mlp_input

PointSink = Callable[[str, CovarianceAccumulator], None]


def collect_covariances(store, acts, layer_kwargs: list[list[dict]], names: list[str], on_point: PointSink, *,
                        normalize: bool = False, head: bool = False,
                        description: str = "Collecting covariances", importance: InputSquares | None = None) -> None:
    """Hand each point in `names` (and, with `head`, the head's input) to `on_point` in stream
    order, all-reduced across ranks, as soon as it is complete. `acts` (the first layer's
    inputs) end as the last layer's outputs. With `importance`, the points also keep the sum
    over RMS-normed tokens, and the inputs of each layer's attention-output and MLP-down
    projections are summed into `importance` (method/importance.py)."""
    wanted = set(names)

    def accumulator(name: str) -> CovarianceAccumulator:
        return CovarianceAccumulator(store.dense, where=f"at {name}", device=store.device, normalize=normalize,
                                     keep_normalized=importance is not None)

    def complete(name: str, found: CovarianceAccumulator) -> None:
        found.all_reduce()
        on_point(name, found)

    if EMBEDDINGS in wanted:
        first = accumulator(EMBEDDINGS)
        for x, mask in zip(acts.hidden, acts.masks):
            first.add(x, mask)
        complete(EMBEDDINGS, first)
    for index, layer in store.dense_layers(description):
        mid, out = mlp_input(index), layer_output(index)
        found = {name: accumulator(name) for name in (mid, out) if name in wanted}
        current, handle = {}, None
        if mid in found:
            handle = get_module(layer, store.family.mlp_norm).register_forward_pre_hook(
                lambda module, args: found[mid].add(args[0], current["mask"]))

        def run(x, kwargs, mask):
            current["mask"] = mask
            if importance is not None:
                importance.mask = mask
            y = first_output(layer(x, **kwargs))
            if out in found:
                found[out].add(y, mask)
            return y

        try:
            if importance is None:
                acts.map(run, layer_kwargs[index], acts.masks)
            else:
                with importance.watching(layer, writer_paths(store.family, index)):
                    acts.map(run, layer_kwargs[index], acts.masks)
        finally:
            if handle is not None:
                handle.remove()
        for name, accumulated in found.items():
            complete(name, accumulated)
    if head:
        head_map = store.head_map()
        at_head = CovarianceAccumulator(store.dense, where="at the head", device=store.device)
        for x, mask in zip(acts.hidden, acts.masks):
            at_head.add(head_map(x), mask)
        complete(HEAD_INPUT, at_head)
