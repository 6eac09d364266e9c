"""Helper for bench/gpu_speed_1b.sh: a random Llama of TinyLlama-1.1B's shape, dense vs sliced speed.

    python bench/gpu_speed_1b.py build DIR [--device cuda] [--dtype bfloat16] [--hidden 2048 ...]
    python bench/gpu_speed_1b.py bench --dense DIR --sliced NAME=DIR [NAME=DIR ...] --out FILE [...]

`build` writes a LlamaForCausalLM with RANDOM weights (seed 0) and SmolLM2's tokenizer, so the
vocabulary is SmolLM2's 49152 tokens (the slicer tokenizes real calibration text with the
model's own tokenizer; TinyLlama's 32000 would not cover its ids). Everything else is
TinyLlama-1.1B's shape: hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV heads,
untied head. Speed does not depend on the weight values.

`bench` loads every model into one process and times them in lock step with
slicegpt.evaluation.benchmark (the code behind `slicegpt bench`), then adds what a batch-1 decode step
must read (bytes of every linear weight) and the speed-up bound that implies, the achieved
bandwidth, and each sliced model's slicing report (parameters, widths, slice time).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def build(args) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    start = time.perf_counter()
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                         max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, dtype=args.dtype)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    try:
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as error:  # noqa: BLE001 - fall back to building on the CPU
        print(f"building on {args.device} failed ({error!r}); building on the CPU", flush=True)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # norms not all ones, so folding them into the matrices does real work
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn_like(param))
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (Path(args.tokenizer) / name).is_file():
            shutil.copy(Path(args.tokenizer) / name, out / name)
    n = sum(p.numel() for p in model.parameters())
    (out / "source.json").write_text(json.dumps({"random_init": {"seed": 0, "shape": config.to_dict()}}))
    print(f"random llama {n:,} parameters ({n / 1e9:.3f} B), {args.layers} layers, hidden {args.hidden}, "
          f"{args.dtype} on {args.device}, built and saved in {time.perf_counter() - start:.1f} s -> {out}", flush=True)


def bench(args) -> None:
    sys.path.insert(0, str(Path(args.snapshot_bench)))
    from speed import matrix_bytes_per_token  # the snapshot's bench/speed.py

    from slicegpt.evaluation.benchmark import BenchSettings, format_table, run_benchmark, summarise
    from slicegpt.io.models import load_model
    from slicegpt.io.report import versions

    paths = {"dense": args.dense}
    for item in args.sliced:
        name, _, path = item.partition("=")
        if (Path(path) / "config.json").is_file():
            paths[name] = path
        else:
            print(f"skipping {name}: no model at {path} (its slicing failed?)", flush=True)
    models, load_s = {}, {}
    for name, path in paths.items():
        start = time.perf_counter()
        models[name] = load_model(path, dtype=args.dtype, device=args.device)[0]
        load_s[name] = round(time.perf_counter() - start, 2)
    settings = BenchSettings(batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")),
                             prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
                             warmup=args.warmup)
    start = time.perf_counter()
    figures = run_benchmark(models, settings, lambda d, t: print(f"repeat {d}/{t} at {time.perf_counter() - start:.0f} s",
                                                                 flush=True))
    environment = {"device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
                   "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()], **versions()}
    if args.device.startswith("cuda"):
        p = torch.cuda.get_device_properties(0)
        environment.update(gpu=p.name, cuda=torch.version.cuda, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                           process_max_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3))
    data = summarise(figures, settings, environment)
    data["bench_s"] = round(time.perf_counter() - start, 1)
    data["load_s"] = load_s
    data["paths"] = paths
    matrix = {name: matrix_bytes_per_token(model) for name, model in models.items()}
    for fig in data["models"]:
        name = fig["name"]
        fig["matrix_bytes_per_token"] = matrix[name]
        step_s = fig["samples"]["1"]["decode_s"] if "1" in fig["samples"] else None
        if step_s:  # achieved bandwidth at batch 1: matrix bytes / median decode step time
            median_step = sorted(step_s)[len(step_s) // 2] / settings.new_tokens
            fig["b1_decode_ms_per_token"] = round(1000 * median_step, 3)
            fig["b1_achieved_gb_s"] = round(matrix[name] / median_step / 1e9, 1)
            fig["b1_bandwidth_floor_ms"] = round(1000 * matrix[name] / (args.peak_gb_s * 1e9), 4)
        report = Path(paths[name]) / "slicing_report.json"
        if report.is_file():
            r = json.loads(report.read_text())
            fig["slicing"] = {"params": r.get("params"), "timings_s": r.get("timings_s"),
                              "widths": r.get("widths"),
                              "config": {k: r["config"].get(k) for k in ("sparsity", "target_ratio", "rotations",
                                                                        "plain", "dtype", "device")
                                         if k in r.get("config", {})}}
    for name, ratios in data["vs_first"].items():
        ratios["bandwidth_bound"] = matrix["dense"] / matrix[name]
    data["peak_gb_s_assumed"] = args.peak_gb_s
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(data, indent=2) + "\n")
    print(format_table(data))
    batches = [str(b) for b in settings.batch_sizes]
    print("\nspeed-up over dense (paired medians) and the batch-1 decode bound from matrix bytes read per token:")
    print(f"{'model':>14} " + " ".join(f"{'decode b' + b:>10}" for b in batches) + " "
          + " ".join(f"{'prefill b' + b:>11}" for b in batches) + f" {'params':>7} {'bw bound':>8}")
    for name, r in data["vs_first"].items():
        print(f"{name:>14} " + " ".join(f"{r['decode'][b]:>9.3f}x" for b in batches) + " "
              + " ".join(f"{r['prefill'][b]:>10.3f}x" for b in batches)
              + f" {r['params']:>6.3f}x {r['bandwidth_bound']:>7.3f}x")
    for fig in data["models"]:
        if "b1_decode_ms_per_token" in fig:
            print(f"{fig['name']:>14}: b1 decode {fig['b1_decode_ms_per_token']:.2f} ms/token, "
                  f"{fig['matrix_bytes_per_token'] / 1e9:.3f} GB of matrices -> {fig['b1_achieved_gb_s']:.0f} GB/s "
                  f"achieved; floor at {args.peak_gb_s:.0f} GB/s: {fig['b1_bandwidth_floor_ms']:.3f} ms; "
                  f"slice {(fig.get('slicing') or {}).get('timings_s')}")
    print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("dir")
    b.add_argument("--device", default="cuda")
    b.add_argument("--dtype", default="bfloat16")
    b.add_argument("--tokenizer", default=str(HERE.parent / ".gpu" / "model"))
    b.add_argument("--hidden", type=int, default=2048)
    b.add_argument("--intermediate", type=int, default=5632)
    b.add_argument("--layers", type=int, default=22)
    b.add_argument("--heads", type=int, default=32)
    b.add_argument("--kv-heads", type=int, default=4)
    b.add_argument("--vocab", type=int, default=49152)
    m = sub.add_parser("bench")
    m.add_argument("--dense", required=True)
    m.add_argument("--sliced", nargs="*", default=[], metavar="NAME=DIR")
    m.add_argument("--out", required=True)
    m.add_argument("--device", default="cuda")
    m.add_argument("--dtype", default="bfloat16")
    m.add_argument("--batch-sizes", default="1,8,32")
    m.add_argument("--prompt-len", type=int, default=128)
    m.add_argument("--new-tokens", type=int, default=32)
    m.add_argument("--repeats", type=int, default=5)
    m.add_argument("--warmup", type=int, default=1)
    m.add_argument("--peak-gb-s", type=float, default=4800.0, help="HBM bandwidth for the floor (H200: 4.8 TB/s)")
    m.add_argument("--snapshot-bench", default=str(HERE.parent / ".gpu" / "snapshot" / "bench"))
    args = parser.parse_args()
    build(args) if args.command == "build" else bench(args)


if __name__ == "__main__":
    main()
