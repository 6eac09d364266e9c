"""Principal components of the residual stream, accumulated in float64."""

from __future__ import annotations

import torch

from slicegpt.errors import SliceGPTError


def rms_normed(x: torch.Tensor) -> torch.Tensor:
    """Each token over its root mean square: what a norm that reads the stream sees, less its
    epsilon and scale (fusion folds the scale into the readers)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).clamp(min=1e-30))


class CovarianceAccumulator:
    """Sums X^T X over every non-padding token it is shown."""

    CHUNK = 4096  # tokens per float32 product

    def __init__(self, dim: int, where: str = "", device: torch.device | str = "cpu", normalize: bool = False,
                 keep_normalized: bool = False):
        self.where = where
        # normalize: weigh every token equally, as the norms that read the stream do.
        self.normalize = normalize
        self.sum = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        # keep_normalized: also the sum over the RMS-normed tokens (what the stream's readers
        # see; method/importance.py), where `sum` is of the raw ones.
        self.normalized_sum = None
        if keep_normalized and not normalize:
            self.normalized_sum = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.tokens = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        x = x.reshape(-1, x.shape[-1])
        if mask is not None:
            x = x[mask.reshape(-1).to(torch.bool)]
        # Each chunk's product in float32 (float64 where the activations are), summed in
        # float64: float32 GEMMs run about 4x faster on CPUs, and a chunk's rounding (~1e-6
        # relative) is far below what decides which directions are kept.
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        self.tokens += x.shape[0]
        for chunk in x.split(self.CHUNK):
            chunk = chunk.to(self.sum.device, compute)
            if self.normalize or self.normalized_sum is not None:
                normed = rms_normed(chunk)
                if self.normalize:
                    chunk = normed
                else:
                    self.normalized_sum += normed.T @ normed
            product = chunk.T @ chunk
            # A NaN or inf anywhere in the chunk shows on the diagonal (sums of squares).
            if not torch.isfinite(product.diagonal()).all():
                raise SliceGPTError(f"non-finite values (NaN or inf) in the activations {self.where}; "
                                    "try float32, or check the model's weights")
            self.sum += product

    @property
    def normalized(self) -> torch.Tensor:
        """The sum of x^T x over the RMS-normed tokens (needs `normalize` or `keep_normalized`)."""
        return self.sum if self.normalize else self.normalized_sum

    def all_reduce(self) -> None:
        """Sum across torch.distributed ranks, where a process group is running."""
        if not _distributed():
            return
        import torch.distributed as dist

        device = _comm_device(self.sum.device)
        total = self.sum.to(device)
        dist.all_reduce(total)
        self.sum = total.to(self.sum.device)
        if self.normalized_sum is not None:
            total = self.normalized_sum.to(device)
            dist.all_reduce(total)
            self.normalized_sum = total.to(self.sum.device)
        count = torch.tensor([float(self.tokens)], dtype=torch.float64, device=device)
        dist.all_reduce(count)
        self.tokens = int(count.item())


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device(device: torch.device) -> torch.device:
    """Where a collective can run: NCCL needs the current GPU, gloo takes any tensor."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _eigh(covariance: torch.Tensor, keep_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    covariance = covariance.double()
    if keep_first:  # e_0 stays the first basis vector; the PCA is of the other coordinates
        values, vectors = _eigh(covariance[1:, 1:])
        basis = torch.zeros_like(covariance)
        basis[0, 0] = 1.0
        basis[1:, 1:] = vectors
        return torch.cat([covariance[:1, 0], values]), basis
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    order = torch.argsort(eigenvalues, descending=True)
    return eigenvalues[order], eigenvectors[:, order]


def principal_basis(covariance: torch.Tensor, keep_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (decreasing) and the matching eigenvectors as columns, in float64.

    With `keep_first` the first column is e_0 and its "eigenvalue" the variance along it;
    the rest are the principal axes of e_0's complement (LayerNorm models with a tied head,
    where coordinate 0 is the mean direction: see fusion.py).

    Under torch.distributed only rank 0 decomposes, and broadcasts the result: eigh may
    pick different signs (or bases of repeated eigenvalues) on different ranks, and every
    rank must rotate its weights identically. Call it with the all-reduced covariance.
    """
    if not _distributed():
        return _eigh(covariance, keep_first)
    import torch.distributed as dist

    device = _comm_device(covariance.device)
    dim = covariance.shape[0]
    if dist.get_rank() == 0:
        eigenvalues, eigenvectors = (t.to(device).contiguous() for t in _eigh(covariance, keep_first))
    else:
        eigenvalues = torch.empty(dim, dtype=torch.float64, device=device)
        eigenvectors = torch.empty(dim, dim, dtype=torch.float64, device=device)
    dist.broadcast(eigenvalues, src=0)
    dist.broadcast(eigenvectors, src=0)
    return eigenvalues.to(covariance.device), eigenvectors.to(covariance.device)
