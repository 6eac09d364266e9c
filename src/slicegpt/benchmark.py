"""Inference speed and memory: prefill and decode tokens/s with a KV cache, dense against sliced.

Prefill is one forward over a random prompt (logits for the last position only, as in
generation); decode is greedy single-token steps after it, reusing the cache. Models are
measured in turns within each repeat, so drift on a busy machine hits them alike; the
figures are medians over repeats. Peak memory is the model's weights plus the largest
growth of resident memory (CPU: VmHWM, reset through /proc/self/clear_refs) or of
allocated memory (CUDA) while it runs.
"""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

GIB = 2**30


@dataclass
class BenchSettings:
    batch_sizes: tuple[int, ...] = (1, 8)
    prompt_len: int = 128
    new_tokens: int = 32
    repeats: int = 5
    warmup: int = 1
    seed: int = 0


@dataclass
class ModelFigures:
    name: str
    params: int
    weights_gib: float
    prefill_tok_s: dict = field(default_factory=dict)
    decode_tok_s: dict = field(default_factory=dict)
    peak_memory_gib: float = 0.0
    samples: dict = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_kwargs(model: nn.Module, cache) -> dict:
    """transformers 5 renamed past_key_values to cache; pass whichever this version takes."""
    params = inspect.signature(model.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


class MemoryProbe:
    """Peak growth of this process's memory on `device` over a block."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.clearable = _reset_hwm()
            self.base = _rss_kib("VmRSS") * 1024

    def peak_growth(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.base
        if not self.clearable:
            return 0
        return max(0, _rss_kib("VmHWM") * 1024 - self.base)


def _rss_kib(field_name: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@torch.no_grad()
def prefill_and_decode(model: nn.Module, batch: int, settings: BenchSettings, vocab: int) -> tuple[float, float]:
    """Seconds for one prefill and for `new_tokens` decode steps, at this batch size."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(settings.seed)
    prompt = torch.randint(0, vocab, (batch, settings.prompt_len), generator=generator).to(device)
    cache = DynamicCache(config=model.config)
    extra = _cache_kwargs(model, cache)
    _sync(device)
    start = time.perf_counter()
    logits = model(input_ids=prompt, use_cache=True, logits_to_keep=1, **extra).logits
    next_ids = logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(settings.new_tokens):
        logits = model(input_ids=next_ids, use_cache=True, logits_to_keep=1, **extra).logits
        next_ids = logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    return prefill, time.perf_counter() - start


def weights_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def run_benchmark(models: dict[str, nn.Module], settings: BenchSettings, progress=None) -> list[ModelFigures]:
    """Measure each model; in each repeat every model runs once per batch size, in turn."""
    from .report import count_parameters

    figures = {}
    for name, model in models.items():
        model.eval()
        figures[name] = ModelFigures(name, count_parameters(model), round(weights_bytes(model) / GIB, 4))
    timings = {name: {b: ([], []) for b in settings.batch_sizes} for name in models}
    peaks = {name: 0 for name in models}
    for repeat in range(settings.warmup + settings.repeats):
        for name, model in models.items():
            device = next(model.parameters()).device
            vocab = model.get_output_embeddings().out_features
            probe = MemoryProbe(device)
            probe.start()
            for batch in settings.batch_sizes:
                prefill, decode = prefill_and_decode(model, batch, settings, vocab)
                if repeat >= settings.warmup:
                    timings[name][batch][0].append(prefill)
                    timings[name][batch][1].append(decode)
            peaks[name] = max(peaks[name], probe.peak_growth())
        if progress:
            progress(repeat + 1, settings.warmup + settings.repeats)
    for name, fig in figures.items():
        for batch, (prefills, decodes) in timings[name].items():
            fig.prefill_tok_s[str(batch)] = batch * settings.prompt_len / statistics.median(prefills)
            fig.decode_tok_s[str(batch)] = batch * settings.new_tokens / statistics.median(decodes)
            fig.samples[str(batch)] = {"prefill_s": prefills, "decode_s": decodes}
        fig.peak_memory_gib = round(fig.weights_gib + peaks[name] / GIB, 4)
    return list(figures.values())


def summarise(figures: list[ModelFigures], settings: BenchSettings, environment: dict) -> dict:
    data = {"settings": asdict(settings), "environment": environment,
            "models": [asdict(f) for f in figures]}
    if len(figures) == 2:
        base, other = figures
        data["ratios"] = {
            "prefill": {b: other.prefill_tok_s[b] / base.prefill_tok_s[b] for b in base.prefill_tok_s},
            "decode": {b: other.decode_tok_s[b] / base.decode_tok_s[b] for b in base.decode_tok_s},
            "peak_memory": other.peak_memory_gib / base.peak_memory_gib if base.peak_memory_gib else None,
            "params": other.params / base.params,
        }
    return data


def format_table(data: dict) -> str:
    batches = [str(b) for b in data["settings"]["batch_sizes"]]
    head = ["model", "params"] + [f"prefill b{b}" for b in batches] + [f"decode b{b}" for b in batches] + ["peak GiB"]
    rows = []
    for m in data["models"]:
        rows.append([Path(m["name"]).name or m["name"], f"{m['params'] / 1e6:.1f}M"]
                    + [f"{m['prefill_tok_s'][b]:.1f}" for b in batches]
                    + [f"{m['decode_tok_s'][b]:.1f}" for b in batches] + [f"{m['peak_memory_gib']:.3f}"])
    if "ratios" in data:
        r = data["ratios"]
        rows.append(["ratio (2nd/1st)", f"{r['params']:.3f}x"] + [f"{r['prefill'][b]:.3f}x" for b in batches]
                    + [f"{r['decode'][b]:.3f}x" for b in batches]
                    + [f"{r['peak_memory']:.3f}x" if r["peak_memory"] else "-"])
    widths = [max(len(str(row[i])) for row in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in [head, *rows]]
    s = data["settings"]
    lines.append(f"tokens/s, median of {s['repeats']} (prompt {s['prompt_len']} tokens, {s['new_tokens']} decoded "
                 f"with a KV cache); {data['environment'].get('device', '')}, "
                 f"{data['environment'].get('threads', '')} threads")
    return "\n".join(lines)
