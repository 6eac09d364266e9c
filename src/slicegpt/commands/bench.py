"""slicegpt bench MODEL_OR_DIR [--compare OTHER]: prefill and decode tokens/s, and peak memory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from slicegpt.evaluation.benchmark import BenchSettings, format_table, run_benchmark, summarise
from slicegpt.errors import SliceGPTError
from slicegpt.io.checkpoint import atomic_file
from slicegpt.io.models import load_model
from slicegpt.io.report import versions
from slicegpt.commands.common import add_model_options, apply_threads, print_json, say


def add_parser(subparsers) -> None:
    defaults = BenchSettings()
    parser = subparsers.add_parser("bench", help="measure prefill/decode speed and peak memory, dense against sliced")
    parser.add_argument("model", metavar="MODEL_OR_DIR", help="smollm2-135m, gemma3-270m, a model or sliced directory, a hub id")
    parser.add_argument("--compare", metavar="OTHER", help="a second model measured in the same run (ratios: OTHER/MODEL)")
    parser.add_argument("--batch-sizes", default=",".join(map(str, defaults.batch_sizes)), metavar="B,B",
                        help="batch sizes (default 1,8)")
    parser.add_argument("--prompt-len", type=int, default=defaults.prompt_len, metavar="L",
                        help=f"prompt tokens for prefill (default {defaults.prompt_len})")
    parser.add_argument("--new-tokens", type=int, default=defaults.new_tokens, metavar="N",
                        help=f"decoded tokens per repeat (default {defaults.new_tokens})")
    parser.add_argument("--repeats", type=int, default=defaults.repeats, help=f"timed repeats (default {defaults.repeats})")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help=f"untimed repeats (default {defaults.warmup})")
    parser.add_argument("--cache", choices=["dynamic", "static"], default=defaults.cache,
                        help="KV cache: dynamic (transformers' default) or static (preallocated; default dynamic)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each model before timing (compiling takes minutes on a small CPU)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--out", metavar="FILE", help="also write the JSON to FILE")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    add_model_options(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    apply_threads(args)
    try:
        batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    except ValueError:
        raise SliceGPTError(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}") from None
    for name in ("prompt_len", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise SliceGPTError(f"--{name.replace('_', '-')} must be at least 1")
    if not batch_sizes or min(batch_sizes) < 1:
        raise SliceGPTError("batch sizes must be at least 1")
    settings = BenchSettings(batch_sizes=batch_sizes, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                             repeats=args.repeats, warmup=max(0, args.warmup), cache=args.cache,
                             compile=args.compile)
    if settings.compile and settings.warmup < 1:
        raise SliceGPTError("--compile needs --warmup 1 or more: the first repeat compiles")
    if args.out is not None and Path(args.out).exists() and not args.overwrite:
        raise SliceGPTError(f"--out {args.out} exists (use --overwrite to replace it)")
    models = {}
    for name in [args.model] + ([args.compare] if args.compare else []):
        models[name], _ = load_model(name, dtype=args.dtype, device=args.device)
    if len(models) < 1 + bool(args.compare):
        raise SliceGPTError("--compare names the same model twice")
    progress = None if args.json else (lambda done, total: say(f"repeat {done}/{total}"))
    figures = run_benchmark(models, settings, progress)
    environment = {"device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
                   "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()], **versions()}
    data = summarise(figures, settings, environment)
    if args.out is not None:
        atomic_file(args.out, json.dumps(data, indent=2) + "\n")
    if args.json:
        print_json(data)
    else:
        print(format_table(data))
    return 0
