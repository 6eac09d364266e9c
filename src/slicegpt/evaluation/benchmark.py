"""Inference speed and memory: prefill and decode tokens/s with a KV cache, dense against sliced.

Prefill is one forward over a random prompt (logits for the last position only, as in
generation); decode is greedy single-token steps after it, reusing the cache.

Shared machines are noisy: a co-tenant can slow one run several-fold. So the models run
in lock step: within each repeat every model prefills in turn, then each decode step is
taken by every model in turn, and every step is timed on its own. Rates are medians over
repeats; ratios against the first model are *paired*: the median, over all repeats and
steps, of the ratio of two timings taken moments apart, which cancels most of the noise
that the rates themselves still carry.

Peak memory is measured in a separate pass, one model at a time: the weights plus the
largest growth of resident memory (CPU: VmHWM, reset through /proc/self/clear_refs) or
of allocated memory (CUDA) while it prefills and decodes at the largest batch size.
"""

from __future__ import annotations

from slicegpt.sizing.counts import count_parameters

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
    # "dynamic": transformers' default cache, grown token by token; "static": preallocated
    # to prompt + new tokens, so every decode step has the same shapes (what compile needs).
    cache: str = "dynamic"
    compile: bool = False  # torch.compile each model's forward before timing (the warm-up compiles)

    def __post_init__(self) -> None:
        if self.cache not in ("dynamic", "static"):
            raise ValueError(f"cache must be 'dynamic' or 'static', got {self.cache!r}")


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


class Generation:
    """One model's greedy generation with a KV cache, timed call by call."""

    def __init__(self, model: nn.Module, batch: int, settings: BenchSettings, forward=None):
        from transformers import DynamicCache, StaticCache

        self.model = model
        self.forward = model if forward is None else forward  # a compiled forward, where asked for
        self.device = next(model.parameters()).device
        vocab = model.get_output_embeddings().out_features
        generator = torch.Generator().manual_seed(settings.seed)
        self.prompt = torch.randint(0, vocab, (batch, settings.prompt_len), generator=generator).to(self.device)
        if settings.cache == "static":
            cache = StaticCache(config=model.config, max_cache_len=settings.prompt_len + settings.new_tokens)
        else:
            cache = DynamicCache(config=model.config)
        self.extra = _cache_kwargs(model, cache)
        self.next_ids = None

    @torch.no_grad()
    def _forward(self, ids: torch.Tensor) -> float:
        _sync(self.device)
        start = time.perf_counter()
        logits = self.forward(input_ids=ids, use_cache=True, logits_to_keep=1, **self.extra).logits
        self.next_ids = logits[:, -1].argmax(-1, keepdim=True)
        _sync(self.device)
        return time.perf_counter() - start

    def prefill(self) -> float:
        return self._forward(self.prompt)

    def step(self) -> float:
        return self._forward(self.next_ids)


def prefill_and_decode(model: nn.Module, batch: int, settings: BenchSettings, forward=None) -> tuple[float, float]:
    """Seconds for one prefill and for `new_tokens` decode steps, at this batch size."""
    run = Generation(model, batch, settings, forward)
    prefill = run.prefill()
    return prefill, sum(run.step() for _ in range(settings.new_tokens))


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
            self.base = _status_kib("VmRSS") * 1024

    def peak_growth(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.base
        if not self.clearable:
            return 0
        return max(0, _status_kib("VmHWM") * 1024 - self.base)


def _status_kib(field_name: str) -> int:
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


def weights_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def run_benchmark(models: dict[str, nn.Module], settings: BenchSettings, progress=None) -> list[ModelFigures]:
    """Time every model in lock step (see the module docstring), then measure memory."""

    names = list(models)
    figures = {}
    forwards = {name: torch.compile(model) if settings.compile else model for name, model in models.items()}
    for name, model in models.items():
        model.eval()
        figures[name] = ModelFigures(name, count_parameters(model), round(weights_bytes(model) / GIB, 4))
        figures[name].samples = {str(b): {"prefill_s": [], "decode_s": [], "decode_steps_s": []}
                                 for b in settings.batch_sizes}
    total = settings.warmup + settings.repeats
    for repeat in range(total):
        for batch in settings.batch_sizes:
            runs = {name: Generation(models[name], batch, settings, forwards[name]) for name in names}
            prefill = {name: runs[name].prefill() for name in names}
            steps = {name: [] for name in names}
            for _ in range(settings.new_tokens):
                for name in names:
                    steps[name].append(runs[name].step())
            if repeat >= settings.warmup:
                for name in names:
                    sample = figures[name].samples[str(batch)]
                    sample["prefill_s"].append(prefill[name])
                    sample["decode_s"].append(sum(steps[name]))
                    sample["decode_steps_s"].append(steps[name])
            del runs
        if progress:
            progress(repeat + 1, total)
    for name, model in models.items():
        fig = figures[name]
        for batch in settings.batch_sizes:
            sample = fig.samples[str(batch)]
            fig.prefill_tok_s[str(batch)] = batch * settings.prompt_len / statistics.median(sample["prefill_s"])
            fig.decode_tok_s[str(batch)] = batch * settings.new_tokens / statistics.median(sample["decode_s"])
        probe = MemoryProbe(next(model.parameters()).device)
        probe.start()
        prefill_and_decode(model, max(settings.batch_sizes), settings, forwards[name])
        fig.peak_memory_gib = round(fig.weights_gib + probe.peak_growth() / GIB, 4)
    return [figures[name] for name in names]


def paired_ratio(base: ModelFigures, other: ModelFigures, batch: str, kind: str) -> float:
    """How many times faster `other` is than `base`: the median of timings paired in time."""
    a, b = base.samples[batch], other.samples[batch]
    if kind == "prefill":
        pairs = zip(a["prefill_s"], b["prefill_s"])
    else:
        pairs = ((x, y) for xs, ys in zip(a["decode_steps_s"], b["decode_steps_s"]) for x, y in zip(xs, ys))
    return statistics.median(x / y for x, y in pairs)


def summarise(figures: list[ModelFigures], settings: BenchSettings, environment: dict) -> dict:
    """JSON-ready figures, with paired speed ratios of every model against the first."""
    base = figures[0]
    data = {"settings": asdict(settings), "environment": environment, "models": [asdict(f) for f in figures]}
    data["vs_first"] = {
        f.name: {
            "prefill": {b: paired_ratio(base, f, b, "prefill") for b in f.prefill_tok_s},
            "decode": {b: paired_ratio(base, f, b, "decode") for b in f.decode_tok_s},
            "peak_memory": f.peak_memory_gib / base.peak_memory_gib if base.peak_memory_gib else None,
            "params": f.params / base.params,
        }
        for f in figures[1:]
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
    first = Path(data["models"][0]["name"]).name
    for name, r in data.get("vs_first", {}).items():
        rows.append([f"{Path(name).name} / {first}", f"{r['params']:.3f}x"]
                    + [f"{r['prefill'][b]:.3f}x" for b in batches] + [f"{r['decode'][b]:.3f}x" for b in batches]
                    + [f"{r['peak_memory']:.3f}x" if r["peak_memory"] else "-"])
    widths = [max(len(str(row[i])) for row in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in [head, *rows]]
    s, env = data["settings"], data["environment"]
    lines.append(f"tokens/s: medians of {s['repeats']} repeats (prompt {s['prompt_len']} tokens, {s['new_tokens']} "
                 f"decoded with a {s.get('cache', 'dynamic')} KV cache"
                 f"{', compiled' if s.get('compile') else ''}); ratios: paired medians (speed-up; params and memory: size ratio); "
                 f"{env.get('device', '')}, {env.get('threads', '')} threads")
    return "\n".join(lines)
