"""Multi-process calibration with torch.distributed.

Launched as `torchrun --nproc_per_node N $(which slicegpt) slice ...`: each rank runs
its share of the calibration batches through the model, the float64 covariances are
summed across ranks (`pca.CovarianceAccumulator.all_reduce`), rank 0 alone computes each
eigendecomposition and broadcasts it (`pca.principal_basis`), so every rank applies the
same rotation and ends with the same weights. Only rank 0 writes files.

Collectives time out after `--dist-timeout` seconds, and a rank whose peer died or
timed out stops with a SliceGPTError that says so, instead of hanging.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch

from slicegpt.config import leading_count
from slicegpt.errors import SliceGPTError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    timeout_s: float = 1800.0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batches: list) -> list:
        """This rank's share of the calibration batches (round robin)."""
        if len(batches) < self.world_size:
            raise SliceGPTError(f"{self.world_size} ranks need at least as many calibration batches, got "
                                f"{len(batches)} (raise --cal-samples or lower --cal-batch-size)")
        return batches[self.rank::self.world_size]

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, value) -> list:
        """Every rank's `value`, in rank order (on every rank)."""
        if not self.enabled:
            return [value]
        import torch.distributed as dist

        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values


def leading_share(batches: list, fraction: float) -> list:
    """This rank's part of the first `fraction` (at least one batch) of all ranks' batches.

    The batches are dealt round robin (`DistContext.shard`), so every rank count picks
    the same global batches as a single process would.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return batches[: leading_count(len(batches), fraction)]
    rank, world = dist.get_rank(), dist.get_world_size()
    counts = [None] * world
    dist.all_gather_object(counts, len(batches))
    wanted = leading_count(sum(counts), fraction)
    return [batch for index, batch in enumerate(batches) if rank + index * world < wanted]


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device: str, timeout_s: float) -> DistContext:
    """Join the process group that torchrun (or another launcher) describes in the environment."""
    if not launched_by_torchrun():
        return DistContext(device=device, timeout_s=timeout_s)
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device.startswith("cuda"):
        if torch.cuda.device_count() <= local_rank:
            raise SliceGPTError(f"rank {rank} needs GPU {local_rank}, but {torch.cuda.device_count()} are visible")
        torch.cuda.set_device(local_rank)
        device, backend = f"cuda:{local_rank}", "nccl"
    else:
        backend = "gloo"
    try:
        if backend == "nccl":
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                    device_id=torch.device(device))
        else:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as error:  # DistStoreError and friends subclass RuntimeError
        raise SliceGPTError(f"rank {rank}: could not join the process group of {world} ranks within "
                            f"{timeout_s:g} s: {error}") from None
    return DistContext(rank=rank, world_size=world, device=device, timeout_s=timeout_s)


def stop(ctx: DistContext) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


@contextmanager
def session(device: str, timeout_s: float):
    """A DistContext for the block; collective failures become one clear SliceGPTError."""
    ctx = start(device, timeout_s)
    try:
        yield ctx
    except SliceGPTError:
        raise
    except RuntimeError as error:
        if not ctx.enabled or not _is_collective_failure(error):
            raise
        raise SliceGPTError(
            f"rank {ctx.rank} of {ctx.world_size}: a collective operation failed, so another rank probably "
            f"died or stalled (timeout {ctx.timeout_s:g} s, --dist-timeout); stopping. "
            f"Cause: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
    finally:
        stop(ctx)


def _is_collective_failure(error: RuntimeError) -> bool:
    import torch.distributed as dist

    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error).lower()
    return any(word in text for word in ("gloo", "nccl", "timed out", "timeout", "connection", "peer",
                                         "broken pipe", "socket", "collective"))
