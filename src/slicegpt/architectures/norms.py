"""The norms families use, as formulas fusion can fold: what they are, and a probe that checks."""

from __future__ import annotations

import torch
from torch import nn

from slicegpt.errors import SliceGPTError


NORM_KINDS = {"rms": "an RMSNorm (x / rms(x) * w)", "rms_plus_one": "an RMSNorm scaled by (1 + w)",
              "layer": "a LayerNorm"}


def norm_module_eps(norm: nn.Module) -> float | None:
    for attr in ("eps", "variance_epsilon"):
        value = getattr(norm, attr, None)
        if isinstance(value, (int, float)):
            return float(value)
    return None


def norm_scale_and_shift(norm: nn.Module, kind: str, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The affine part of a norm, as (scale, shift) in float64 (a norm without a weight scales by 1)."""
    weight = getattr(norm, "weight", None)
    if weight is None:
        size = dim if dim is not None else norm.normalized_shape[-1]
        weight = torch.ones(size, dtype=torch.float64)
    weight = weight.detach().double()
    if kind == "rms":
        return weight, None
    if kind == "rms_plus_one":
        return 1.0 + weight, None
    if kind == "layer":
        bias = getattr(norm, "bias", None)
        return weight, None if bias is None else bias.detach().double()
    raise ValueError(f"unknown norm kind {kind!r}")


@torch.no_grad()
def check_norm(norm: nn.Module, kind: str, error: SliceGPTError) -> None:
    """Probe the norm: it must compute the formula `kind` names, since that is what fusion folds."""
    eps = norm_module_eps(norm)
    weight = getattr(norm, "weight", None)
    if eps is None or (weight is not None and not isinstance(weight, torch.Tensor)):
        raise error
    if weight is not None and weight.is_meta:
        return  # no values to probe; the module checks above still apply
    dim = weight.shape[-1] if weight is not None else getattr(norm, "normalized_shape", (None,))[-1]
    if dim is None:
        raise error
    device = weight.device if weight is not None else "cpu"
    dtype = weight.dtype if weight is not None and weight.is_floating_point() else torch.float32
    # A non-zero mean separates LayerNorm from RMSNorm; two rows of different scale.
    x = torch.randn(2, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
    x[1] *= 3.0
    try:
        actual = norm(x.to(device, dtype)).double().cpu()
        scale, shift = norm_scale_and_shift(norm, kind, dim)
    except Exception:
        raise error from None
    centred = x - x.mean(-1, keepdim=True) if kind == "layer" else x
    expected = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps) * scale.cpu()
    if shift is not None:
        expected = expected + shift.cpu()
    tolerance = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4
    if not torch.allclose(actual, expected, rtol=tolerance, atol=tolerance):
        raise error
