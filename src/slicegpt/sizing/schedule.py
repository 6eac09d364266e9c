"""Per-point widths from the eigenvalue spectrum, at a given real parameter budget.

Every stream point keeps the smallest width that holds the same fraction of its
variance; the fraction is the largest whose sliced model fits the budget. Points that
share a basis share a width. The spectra come from one pass of the fused dense model
over part of the calibration set.
"""

from __future__ import annotations

import torch
from torch import nn

from slicegpt.sizing.budget import basis_owner, predicted_parameters
from slicegpt.config import SliceConfig
from slicegpt.errors import SliceGPTError
from slicegpt.architectures.family import Family, get_module
from slicegpt.method.pca import CovarianceAccumulator, principal_basis
from slicegpt.method.points import HEAD_INPUT, stream_points


def width_for_fraction(eigenvalues: torch.Tensor, fraction: float, round_to: int) -> int:
    """Smallest multiple of round_to whose leading eigenvalues hold `fraction` of the variance."""
    cumulative = torch.cumsum(eigenvalues.clamp(min=0), 0) / eigenvalues.clamp(min=0).sum()
    needed = int(torch.searchsorted(cumulative, torch.tensor(fraction, dtype=cumulative.dtype)).item()) + 1
    width = -(-needed // round_to) * round_to
    return max(round_to, min(width, eigenvalues.shape[0]))


def widths_for_fraction(spectra: dict[str, torch.Tensor], owner: dict[str, str], fraction: float,
                        round_to: int) -> dict[str, int]:
    by_owner: dict[str, int] = {}
    for name, eigenvalues in spectra.items():
        width = width_for_fraction(eigenvalues, fraction, round_to)
        by_owner[owner[name]] = max(by_owner.get(owner[name], 0), width)
    return {name: by_owner[owner[name]] for name in spectra}


def spectra_of(covariances: dict[str, CovarianceAccumulator], mean_axis: bool = False) -> dict[str, torch.Tensor]:
    """Eigenvalues at every stream point (from `running.covariances.collect_covariances` on the fused dense model);
    `mean_axis`: as the bases will be, coordinate 0 first (pca.principal_basis)."""
    return {name: principal_basis(acc.sum, keep_first=mean_axis)[0] for name, acc in covariances.items()
            if name != HEAD_INPUT}


def variance_schedule(model: nn.Module, family: Family, config: SliceConfig, spectra: dict[str, torch.Tensor],
                      target: int, facts: dict | None = None) -> dict[str, int]:
    """Per-point widths holding an equal variance fraction, the largest that fits `target` parameters."""
    layers = len(get_module(model, family.layers))
    names = stream_points(family, layers)
    owner = basis_owner(config, names, layers)
    spectra = {name: spectra[name] for name in names}

    def size(fraction: float) -> tuple[int, dict[str, int]]:
        widths = widths_for_fraction(spectra, owner, fraction, config.round_to)
        return predicted_parameters(model, family, config, widths, facts), widths

    low, high = 0.0, 1.0
    if size(low)[0] > target:
        raise SliceGPTError(f"no variance schedule meets the budget of {target:,} parameters")
    for _ in range(30):  # bisection on the kept fraction
        middle = (low + high) / 2
        low, high = (middle, high) if size(middle)[0] <= target else (low, middle)
    return size(low)[1]
