"""Inference speed of SmolLM2-135M: dense against 20/25/30% sliced, prefill and decode tokens/s.

The sliced models are made with a small calibration set (8 x 256 tokens of WikiText-2;
speed does not depend on it) into a scratch directory. All models are loaded in one
process and measured in turns within each repeat (`slicegpt.evaluation.benchmark`), so machine
noise hits them alike; figures are medians. "20%", "25%", "30%" use the default layout
(`--rotations auto`: one basis, no shortcuts, at 20% and 25%; a basis per block at 30%).
"25% block", "25% layer" and "25% model" are sliced with `--rotations block` (the paper's
two shortcuts per layer), `--rotations layer` (one shortcut per layer) and `--rotations
model --plain` (none: a plain Llama, 25% of the width). An extra model, "25% no fast
paths", is the 25%
model with the sliced layer's fast paths switched off (shortcut as a separate linear plus
an add, the norm written out op by op): the before/after of those paths.

The last column is the bandwidth bound: at batch 1 decoding reads every matrix once per
token, so the best possible speed-up is the ratio of matrix bytes read per token (the
embedding table is only indexed and not counted; a tied dense head is counted once).

    python bench/speed.py                       # CPU, 2 threads
    python bench/speed.py --device cuda --threads 0 --out bench/results/speed_cuda.json
    python bench/speed.py --sparsities 0.25 --variants "" --cache static --compile --out bench/results/speed_compiled.json
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch
from torch import nn

import harness

VARIANTS = {  # name suffix -> extra `slicegpt slice` flags (see docs/size-and-quality.md)
    "": [],  # the default layout (--rotations auto)
    " block": ["--rotations", "block"],
    " layer": ["--rotations", "layer"],
    " model": ["--rotations", "model", "--plain"],
}


def make_sliced(sparsity: float, scratch: Path, device: str, variant: str = "") -> Path:
    out = scratch / f"smollm2-135m-sliced-{sparsity}{variant.replace(' ', '-')}"
    if not (out / "config.json").exists():
        print(f"slicing at {sparsity}{variant} ...", file=sys.stderr, flush=True)
        harness.run_slicegpt("slice", harness.MODEL, "--sparsity", str(sparsity), "--out", str(out), "--overwrite",
                             "--cal-data", str(harness.CAL_DATA), "--cal-samples", "8", "--cal-seqlen", "256",
                             "--cal-batch-size", "4", "--device", device, *VARIANTS[variant])
    return out


def matrix_bytes_per_token(model: nn.Module) -> int:
    """Bytes of every linear weight (what a batch-1 decode step must read), shared ones once."""
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.data_ptr() not in seen:
            seen.add(module.weight.data_ptr())
            total += module.weight.numel() * module.weight.element_size()
    return total


def _plain_residual(shortcut, x, out):
    return (x if shortcut is None else shortcut(x)) + out


def _plain_norm(self, x):
    compute = torch.promote_types(x.dtype, torch.float32)
    y = x.to(compute)
    scale = torch.rsqrt(y.pow(2).sum(-1, keepdim=True) / self.dense_width + self.eps)
    return (y * scale).to(x.dtype)


def without_fast_paths(model: nn.Module) -> nn.Module:
    """Switch this model's sliced fast paths off (per instance, so other models are untouched)."""
    for module in model.modules():
        if type(module).__name__ == "SlicedDecoderLayer":
            module._residual = _plain_residual
        elif type(module).__name__ == "SlicedRMSNorm":
            module.forward = types.MethodType(_plain_norm, module)
    return model


def main() -> None:
    from slicegpt.evaluation.benchmark import BenchSettings, format_table, run_benchmark, summarise
    from slicegpt.io.models import load_model
    from slicegpt.io.report import versions

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", default="0.2,0.25,0.3")
    parser.add_argument("--threads", type=int, default=harness.THREADS,
                        help="torch threads (0: leave torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache", choices=["dynamic", "static"], default="dynamic", help="KV cache (default dynamic)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model (the warm-up repeat compiles)")
    parser.add_argument("--no-ablation", action="store_true", help="skip the '25%% no fast paths' model")
    parser.add_argument("--variants", default="block,layer,model",
                        help="also 25%% with --rotations block / layer / model (comma-separated; empty for none)")
    parser.add_argument("--scratch", type=Path, default=Path("/work/scratch/speed"))
    parser.add_argument("--out", type=Path, default=harness.RESULTS / "speed.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    sparsities = [float(s) for s in args.sparsities.split(",")]
    paths = {f"{int(s * 100)}%": make_sliced(s, args.scratch, args.device) for s in sparsities}
    for variant in [f" {v}" for v in args.variants.split(",") if v]:
        paths[f"25%{variant}"] = make_sliced(0.25, args.scratch, args.device, variant)
    models = {"dense": load_model(harness.MODEL, dtype=args.dtype, device=args.device)[0]}
    for name, path in paths.items():
        models[name] = load_model(str(path), dtype=args.dtype, device=args.device)[0]
    if not args.no_ablation and "25%" in paths:
        models["25% no fast paths"] = without_fast_paths(load_model(str(paths["25%"]), dtype=args.dtype, device=args.device)[0])

    settings = BenchSettings(batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")),
                             prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
                             cache=args.cache, compile=args.compile)
    figures = run_benchmark(models, settings, lambda d, t: print(f"repeat {d}/{t}", file=sys.stderr, flush=True))
    environment = {"device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
                   "load_average_1_5_15": harness.load_average(), **versions()}
    data = summarise(figures, settings, environment)
    bound = {f.name: matrix_bytes_per_token(models["dense"]) / matrix_bytes_per_token(models[f.name]) for f in figures}
    for name, ratios in data["vs_first"].items():
        ratios["bandwidth_bound"] = bound[name]
    harness.write_json(args.out, data)
    print(format_table(data))
    batches = [str(b) for b in settings.batch_sizes]
    print("\nspeed-up over dense (paired medians) and the batch-1 decode bound from bytes read per token:")
    print(f"{'model':>18} " + " ".join(f"{'decode b' + b:>10}" for b in batches) + " "
          + " ".join(f"{'prefill b' + b:>10}" for b in batches) + f" {'params':>7} {'bw bound':>8}")
    for name, r in data["vs_first"].items():
        print(f"{name:>18} " + " ".join(f"{r['decode'][b]:>9.3f}x" for b in batches) + " "
              + " ".join(f"{r['prefill'][b]:>9.3f}x" for b in batches)
              + f" {r['params']:>6.3f}x {r['bandwidth_bound']:>7.3f}x")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
