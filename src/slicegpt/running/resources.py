"""How much memory and disk a run needs, checked before any work starts."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from slicegpt.errors import SliceGPTError

GIB = 2**30


def gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB"


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def available_memory(device: str = "cpu") -> int:
    """Bytes that can still be allocated on `device` without swapping (MemAvailable on Linux)."""
    if str(device).startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def release_memory() -> None:
    """Hand freed memory back to the OS.

    glibc keeps freed heap memory for reuse; across the layers of a streaming run that
    showed as resident memory creeping up layer after layer (0.59 -> 0.89 GiB over 8 layers
    of a 2048-wide model), and flat at 0.50 GiB with a trim after each layer.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def free_disk(path: str | Path) -> int:
    """Free bytes on the filesystem that holds `path` (or would, once created)."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def activation_bytes(samples: int, seqlen: int, width: int, dtype: torch.dtype) -> int:
    """One stream point's calibration activations, at the dense width."""
    return samples * seqlen * width * dtype_bytes(dtype)


def in_memory_bytes(parameters: int, dtype: torch.dtype, activations: int, largest_matrix: int) -> int:
    """What slicing in memory needs: weights, activations (and one batch more), and the float64
    temporaries of rotating the largest matrix (its copy, the product, and the basis)."""
    return parameters * dtype_bytes(dtype) + activations + 3 * largest_matrix * 8 + GIB // 2


def check_disk(path: str | Path, needs: dict[str, int], already_there: int = 0) -> None:
    """Refuse before work starts when `path`'s filesystem cannot take `needs` (name -> bytes)."""
    total = sum(needs.values()) - already_there
    free = free_disk(path)
    if total > free:
        parts = ", ".join(f"{name} {gib(size)}" for name, size in needs.items() if size)
        raise SliceGPTError(f"not enough disk space for {path}: this run needs about {gib(total)} ({parts}"
                            f"{f', less {gib(already_there)} already written' if already_there else ''}), "
                            f"but only {gib(free)} is free")


def _first(config: dict, *names: str, default: int | None = None) -> int | None:
    for name in names:
        if isinstance(config.get(name), int):
            return config[name]
    return default


def generation_bytes(config: dict, prompt_len: int, new_tokens: int, dtype: torch.dtype) -> int | None:
    """Memory one sequence of a greedy generation takes beyond the weights, from config.json: its KV
    cache over prompt and new tokens, one prefill layer's widest activations and attention scores,
    and the last position's logits (float32). None where the config does not say its sizes."""
    config = config.get("text_config") or config
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    layers = _first(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first(config, "num_attention_heads", "n_head", "num_heads")
    vocab = _first(config, "vocab_size")
    if not (hidden and layers and heads and vocab):
        return None
    kv_heads = _first(config, "num_key_value_heads", "num_kv_heads", default=1 if config.get("multi_query") else heads)
    head_dim = _first(config, "head_dim", default=hidden // heads)
    inner = _first(config, "intermediate_size", "n_inner", "ffn_hidden_size", default=4 * hidden)
    size = dtype_bytes(dtype)
    cache = (prompt_len + new_tokens) * layers * 2 * kv_heads * head_dim * size
    activations = prompt_len * (3 * inner + 4 * hidden) * size + heads * prompt_len**2 * size
    return cache + activations + vocab * 4


def check_generation_memory(models: dict[str, dict], weights: int, batch: int, prompt_len: int, new_tokens: int,
                            dtype: torch.dtype, device: str = "cpu") -> None:
    """Refuse a batch whose generation (every model's cache alive at once, as `bench` runs them in
    lock step) cannot fit in `device`'s free memory with the weights, naming the largest that would."""
    per_sequence = [generation_bytes(config, prompt_len, new_tokens, dtype) for config in models.values()]
    if None in per_sequence:
        return
    per_sequence_total = sum(per_sequence)
    need, free = weights + batch * per_sequence_total, available_memory(device)
    if need <= free:
        return
    largest = (free - weights) // per_sequence_total if free > weights else 0
    raise SliceGPTError(f"--batch-sizes {batch}: {batch} sequences of {prompt_len + new_tokens} tokens need about "
                        f"{gib(need)} (weights, KV cache, activations and logits), and {gib(free)} is free on "
                        f"{device}; " + (f"the largest batch that fits is about {largest}" if largest >= 1 else
                                         "not even one sequence fits"))
