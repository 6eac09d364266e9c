"""Ridge least squares over calibration tokens, for the refit (refit.py)."""

from __future__ import annotations

import torch

from slicegpt.method.pca import _comm_device, _distributed

# Ridge weight, relative to the mean of diag(Z^T Z): small enough that well-visited
# directions follow the data, large enough to keep the solve well conditioned and to
# keep the rotated weights where the calibration text says little. On protocol P, 0.1
# beat 0.01 on WikiText-2 and on text unlike it (bench/README.md).
DAMPING = 1e-1


def ridge_solve(gram: torch.Tensor, cross: torch.Tensor, previous: torch.Tensor, damping: float) -> torch.Tensor:
    """argmin_W |Z W^T - R|^2 + lam |W - previous|^2 from gram = Z^T Z and cross = Z^T R,
    lam = damping x mean(diag(Z^T Z)); float64 in and out."""
    previous = previous.to(gram.device, torch.float64)
    lam = damping * gram.diagonal().mean().clamp(min=1e-12)
    system = gram + lam * torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
    return torch.linalg.solve(system, cross + lam * previous.T).T


class LeastSquares:
    """Sums Z^T Z and Z^T R over the tokens it is shown; solves for W in Z W^T ~ R.

    Z^T Z is symmetric, so only its upper triangle is summed, in strips of columns: about
    two thirds of the work of the full product, which dominates the refit's own cost.
    """

    CHUNK = 4096  # tokens per product
    STRIP = 256  # columns of Z^T Z per product

    def __init__(self, inputs: int, outputs: int, device):
        self._upper = torch.zeros(inputs, inputs, dtype=torch.float64, device=device)
        self.cross = torch.zeros(inputs, outputs, dtype=torch.float64, device=device)

    @property
    def gram(self) -> torch.Tensor:
        """Z^T Z (float64)."""
        return self._upper.triu() + self._upper.triu(1).T

    @torch.no_grad()
    def add(self, Z: torch.Tensor, R: torch.Tensor, mask: torch.Tensor | None) -> None:
        Z, R = Z.reshape(-1, Z.shape[-1]), R.reshape(-1, R.shape[-1])
        if mask is not None and not bool(mask.all()):
            keep = mask.reshape(-1).to(torch.bool)
            Z, R = Z[keep], R[keep]
        # Products in float32 (float64 where the activations are), summed in float64, as pca does.
        compute = torch.float64 if Z.dtype == torch.float64 else torch.float32
        width = Z.shape[1]
        for z, r in zip(Z.split(self.CHUNK), R.split(self.CHUNK)):
            z, r = z.to(self._upper.device, compute), r.to(self._upper.device, compute)
            for start in range(0, width, self.STRIP):
                self._upper[start:start + self.STRIP, start:] += z[:, start:start + self.STRIP].T @ z[:, start:]
            self.cross += z.T @ r

    def all_reduce(self) -> None:
        if not _distributed():
            return
        import torch.distributed as dist

        for name in ("_upper", "cross"):
            total = getattr(self, name).to(_comm_device(self.cross.device))
            dist.all_reduce(total)
            setattr(self, name, total.to(self.cross.device))

    def solve(self, previous: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
        """argmin_W |Z W^T - R|^2 + lam |W - previous|^2, lam = damping x mean(diag(Z^T Z))."""
        return ridge_solve(self.gram, self.cross, previous, damping)

    def solve_in_turn(self, previous: list[torch.Tensor], damping: float = DAMPING) -> list[torch.Tensor]:
        """Z is several maps' inputs side by side, and R what their outputs together should add
        to the stream, beyond what they write now (Z previous^T). Refit the maps one after another,
        each with the ones before it already refit and the ones after it as they are."""
        gram, cross = self.gram, self.cross.clone()
        widths = [weight.shape[1] for weight in previous]
        bounds = [sum(widths[:k]) for k in range(len(widths) + 1)]
        solved = []
        for k, weight in enumerate(previous):
            part = slice(bounds[k], bounds[k + 1])
            weight = weight.to(gram.device, torch.float64)
            new = ridge_solve(gram[part, part], cross[part] + gram[part, part] @ weight.T, weight, damping)
            # What the later maps must make up shrinks by what this one now adds.
            cross -= gram[:, part] @ (new - weight).T
            solved.append(new)
        return solved
