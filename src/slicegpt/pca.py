"""Principal components of the residual stream, accumulated in float64."""

from __future__ import annotations

import torch

from .errors import SliceGPTError


class CovarianceAccumulator:
    """Sums X^T X over every non-padding token it is shown."""

    def __init__(self, dim: int, where: str = "", device: torch.device | str = "cpu", normalize: bool = False):
        self.where = where
        # normalize: weigh every token equally, as the norms that read the stream do.
        self.normalize = normalize
        self.sum = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.tokens = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        x = x.reshape(-1, x.shape[-1])
        if mask is not None:
            x = x[mask.reshape(-1).to(torch.bool)]
        x = x.to(self.sum.device, torch.float64)
        if not torch.isfinite(x).all():
            raise SliceGPTError(f"non-finite values (NaN or inf) in the activations {self.where}; "
                                "try float32, or check the model's weights")
        if self.normalize:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).clamp(min=1e-30))
        self.sum.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def all_reduce(self) -> None:
        """Sum across torch.distributed ranks, where a process group is running."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.sum)
            count = torch.tensor([self.tokens], dtype=torch.float64, device=self.sum.device)
            dist.all_reduce(count)
            self.tokens = int(count.item())


def principal_basis(covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (decreasing) and the matching eigenvectors as columns, in float64."""
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())
    order = torch.argsort(eigenvalues, descending=True)
    return eigenvalues[order], eigenvectors[:, order]
