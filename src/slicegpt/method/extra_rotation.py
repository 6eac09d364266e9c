"""One more orthogonal rotation of a plain model's residual stream, inside the kept width.

A plain model (a slice with one basis, or a model at sparsity 0) whose stream norms have a
uniform scale computes the same function after any orthogonal R is folded into it:
embeddings E <- E R, every reader W_in <- R^T W_in, every writer W_out <- W_out R (and its
bias), the head reads R^T too. The PCA basis piles the stream's energy into its leading
coordinates; a rotation spreads it (and any outlier coordinate) over all of them, which
changes how well 32- and 256-value quantization blocks fit (QuaRot, SpinQuant). Whether
it helps llama.cpp's quantizers is measured (bench/llama_cpp_quant.py), not assumed.

R is a randomized Hadamard matrix, H diag(signs) / sqrt(n), where the width n is a power
of two, else a seeded random orthogonal matrix (QR of a Gaussian, signs fixed).

The readers' importance (method/importance.py) keeps only diagonals, so it is carried
through R as if the stream covariance were diagonal in the PCA basis (as it nearly is):
new_j = sum_i R_ij^2 old_i. The projections' inputs are not rotated and keep theirs.
"""

from __future__ import annotations

import torch
from torch import nn

from slicegpt.architectures.family import Family, get_module
from slicegpt.architectures.modeling_sliced import stream_weight
from slicegpt.errors import SliceGPTError
from slicegpt.method.importance import layer_path
from slicegpt.method.rotation import rotate_input, rotate_output

KINDS = ("hadamard", "random")


def hadamard(n: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix of order n (a power of two), entries +-1."""
    if n < 1 or n & (n - 1):
        raise SliceGPTError(f"a Hadamard matrix needs a power-of-two order, not {n}")
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def extra_rotation(width: int, seed: int = 0, kind: str = "auto") -> tuple[torch.Tensor, str]:
    """(R, the kind used): a randomized Hadamard where `width` is a power of two (kind auto or
    hadamard), else a seeded random orthogonal matrix."""
    generator = torch.Generator().manual_seed(seed)
    power_of_two = width & (width - 1) == 0
    if kind == "hadamard" and not power_of_two:
        raise SliceGPTError(f"a Hadamard rotation needs a power-of-two width, not {width}: use random")
    if kind in ("auto", "hadamard") and power_of_two:
        signs = torch.randint(0, 2, (width,), generator=generator).double() * 2 - 1
        return signs[:, None] * hadamard(width) / width ** 0.5, "hadamard"
    if kind not in ("auto", "random"):
        raise SliceGPTError(f"rotation must be auto, hadamard or random, not {kind!r}")
    Q, R = torch.linalg.qr(torch.randn(width, width, generator=generator, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))[None, :], "random"


def plain_family(model: nn.Module) -> Family:
    """The family description of a plain model (a slice's plain export has a narrower stream than
    its config's original, so the checks of families.family_for do not apply)."""
    from slicegpt.architectures.families import FAMILIES

    if type(model).__name__ not in FAMILIES:
        raise SliceGPTError(f"no family description for {type(model).__name__}")
    return FAMILIES[type(model).__name__].for_config(model.config)


def _stream_norms(model: nn.Module, family: Family) -> list[nn.Module]:
    layers = get_module(model, family.layers)
    norms = [get_module(model, family.final_norm)]
    for index in range(len(layers)):
        local = family.for_layer(index)
        norms += [get_module(layers[index], path) for path in (local.attn_norm, local.mlp_norm) if path]
    return norms


@torch.no_grad()
def rotate_plain_model(model: nn.Module, family: Family, R: torch.Tensor) -> None:
    """Fold R into a plain model's stream in place (the function is unchanged)."""
    for norm in _stream_norms(model, family):
        weight = getattr(norm, "weight", None)
        if getattr(norm, "bias", None) is not None or (weight is not None and not torch.all(weight == weight[0])):
            raise SliceGPTError("an extra rotation needs stream norms with one scale and no bias: slice the model "
                                "(any sparsity, one basis) first, so the norms are folded")
    for path in family.embeddings:
        rotate_input(stream_weight(model, path), R)
    layers = get_module(model, family.layers)
    for index in range(len(layers)):
        local = family.for_layer(index)
        for path in (*local.attn_inputs, *local.mlp_inputs):
            rotate_input(stream_weight(layers[index], path), R)
        for path in (*local.writers("attn"), *local.writers("mlp")):
            rotate_output(stream_weight(layers[index], path), R)
    tied = getattr(model.config, "tie_word_embeddings", False)
    head = get_module(model, family.head)
    if not tied or head.weight.data_ptr() != stream_weight(model, family.embeddings[0]).weight.data_ptr():
        rotate_input(stream_weight(model, family.head), R)


def rotate_importance(importance: dict[str, torch.Tensor], model: nn.Module, family: Family,
                      R: torch.Tensor) -> dict[str, torch.Tensor]:
    """The readers' importance carried through R (diagonal approximation, see above)."""
    weights = R.double().pow(2)
    layers = len(get_module(model, family.layers))
    readers = {family.head} | {layer_path(family, i, p) for i in range(layers)
                               for p in (*family.for_layer(i).attn_inputs, *family.for_layer(i).mlp_inputs)}
    return {name: (values.double() @ weights).float() if name in readers else values
            for name, values in importance.items()}
