"""Stream points: the places where blocks read the residual stream, named in one place.

A point is named by a plain string, because the names are keys in JSON files (the report's
variance kept, spectra.json, resume checkpoints). Only this module builds or reads them.
"""

from __future__ import annotations

from slicegpt.architectures.family import Family

EMBEDDINGS = "embeddings"  # the first layer's input
HEAD_INPUT = "head input"  # what a tied head reads: the final map's output


def mlp_input(layer: int) -> str:
    """Between a sequential layer's attention and its MLP."""
    return f"layer {layer} mlp input"


def layer_output(layer: int) -> str:
    return f"layer {layer} output"


def layer_input(layer: int) -> str:
    """A layer reads the embeddings or the layer before's output."""
    return EMBEDDINGS if layer == 0 else layer_output(layer - 1)


def layer_of(point: str) -> int:
    """The layer a point belongs to (the embeddings count with layer 0)."""
    return 0 if point == EMBEDDINGS else int(point.split()[1])


def stream_points(family: Family, layers: int) -> list[str]:
    """Every point in stream order; a layer's output is the next layer's input."""
    names = [EMBEDDINGS]
    for index in range(layers):
        if family.mlp_norm is not None and not family.parallel:
            names.append(mlp_input(index))
        names.append(layer_output(index))
    return names
