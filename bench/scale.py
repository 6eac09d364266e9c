"""Streaming-mode scale benchmark: a random 7B-shaped Llama sliced at 25% in little memory.

The model has Llama-2-7B's shape (hidden 4096, intermediate 11008, 32 heads, 32 layers)
with SmolLM2's 49152-token vocabulary, so the SmolLM2 tokenizer can feed it real text:
6.87 B parameters, 13.7 GB of float16 safetensors, one shard per layer. It is generated
layer by layer (never more than one layer in memory) into a scratch directory outside
the repository. Views with fewer layers share its shard files (symlinks and a shorter
index), so "the same model cut to 8 and 16 layers" costs no extra disk.

Each case runs `slicegpt slice --streaming` in a child process; peak RSS is the child's
own (wait4), and a sampler records RSS over time.

    python bench/scale.py --layers 2             # estimate the time per layer first
    python bench/scale.py --layers 8,16          # the depth sweep (peak RSS flat in depth)
    python bench/scale.py --layers 32            # the whole model, when time allows
    python bench/scale.py --layers 2,4 --generate-layers 4 --extra=--refit --tag refit   # the refit, streamed
Writes bench/results/scale.json (merging cases across runs) and prints a table.
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

import harness

RESULTS = harness.RESULTS / "scale.json"
SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
             num_hidden_layers=32, vocab_size=49152, max_position_embeddings=4096, rms_norm_eps=1e-5,
             tie_word_embeddings=False)


def generate(directory: Path, layers: int = 32, seed: int = 0) -> Path:
    """Write the random model one shard per piece; skips what is already complete."""
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from slicegpt.io.models import resolve
    from slicegpt.io.shards import shard_name, write_index

    directory.mkdir(parents=True, exist_ok=True)
    config = transformers.LlamaConfig(**{**SHAPE, "num_hidden_layers": layers}, dtype="float16")
    total = layers + 2
    generator = torch.Generator().manual_seed(seed)
    h, f, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]

    def normal(*shape, std=0.02):
        return (torch.randn(*shape, generator=generator) * std).to(torch.float16)

    def norm_weight():  # not all ones, so fusion does real work
        return (1.0 + 0.1 * torch.randn(h, generator=generator)).to(torch.float16)

    pieces = [("embed", 1)] + [(f"layer{i}", i + 2) for i in range(layers)] + [("head", total)]
    for piece, index in pieces:
        path = directory / shard_name(index, total)
        if path.exists():
            continue
        if piece == "embed":
            tensors = {"model.embed_tokens.weight": normal(v, h)}
        elif piece == "head":
            tensors = {"lm_head.weight": normal(v, h), "model.norm.weight": norm_weight()}
        else:
            p = f"model.layers.{piece[5:]}."
            tensors = {p + "input_layernorm.weight": norm_weight(), p + "post_attention_layernorm.weight": norm_weight()}
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                tensors[p + f"self_attn.{name}.weight"] = normal(h, h)
            tensors[p + "mlp.gate_proj.weight"] = normal(f, h)
            tensors[p + "mlp.up_proj.weight"] = normal(f, h)
            tensors[p + "mlp.down_proj.weight"] = normal(h, f)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, tmp, metadata={"format": "pt"})
        tmp.rename(path)
        print(f"  wrote {path.name}", file=sys.stderr, flush=True)
        del tensors
    write_index(directory)
    config.save_pretrained(directory)
    AutoTokenizer.from_pretrained(resolve(harness.MODEL)).save_pretrained(directory)
    return directory


def cut(full: Path, layers: int, target: Path) -> Path:
    """A model directory with the first `layers` layers of `full`, sharing its shard files."""
    from slicegpt.io.shards import INDEX_FILE

    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    index = json.loads((full / INDEX_FILE).read_text())
    keep = {}
    for name, file in index["weight_map"].items():
        if name.startswith("model.layers."):
            if int(name.split(".")[2]) >= layers:
                continue
        keep[name] = file
    for file in set(keep.values()):
        (target / file).symlink_to(full / file)
    (target / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": keep}, indent=1))
    config = json.loads((full / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (target / "config.json").write_text(json.dumps(config, indent=1))
    for extra in full.iterdir():
        if extra.name.startswith("tokenizer") or extra.name in ("special_tokens_map.json", "chat_template.jinja"):
            shutil.copy(extra, target / extra.name)
    return target


def slice_case(model: Path, out: Path, args) -> dict:
    command = harness.slicegpt_command(
        "slice", str(model), "--sparsity", "0.25", "--out", str(out), "--streaming", "--overwrite", "--fresh",
        "--dtype", args.dtype, "--threads", str(args.threads), "--cal-data", str(harness.CAL_DATA),
        "--cal-samples", str(args.cal_samples), "--cal-seqlen", str(args.cal_seqlen),
        "--cal-batch-size", str(args.cal_samples), *args.extra.split())
    run = harness.run_watched(command)
    if run.returncode != 0:
        sys.exit(f"slicing failed:\n{run.stderr[-3000:]}")
    report = json.loads((out / "slicing_report.json").read_text())
    output_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    trace = [(seconds, rss / 2**30) for seconds, rss in run.rss_samples]
    return {"wall_s": round(run.wall_s, 1), "calibrate_and_slice_s": report["timings_s"]["calibrate_and_slice"],
            "cpu_s": round(run.usage.ru_utime + run.usage.ru_stime, 1),
            "peak_rss_gib": round(run.peak_rss_bytes / 2**30, 3), "params": report["params"],
            "output_gib": round(output_bytes / 2**30, 3), "rss_trace_gib": trace[::4],
            "stdout": run.stdout.strip().splitlines()[-3:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="8,16", help="comma-separated layer counts to slice (default 8,16)")
    parser.add_argument("--scratch", type=Path, default=Path(os.environ.get("SLICEGPT_SCRATCH", "/work/scratch/scale-7b")))
    parser.add_argument("--cal-samples", type=int, default=4)
    parser.add_argument("--cal-seqlen", type=int, default=128)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--threads", type=int, default=harness.THREADS)
    parser.add_argument("--keep-output", action="store_true", help="keep the sliced directories")
    parser.add_argument("--extra", default="", help='more slice options, e.g. "--refit" (use --extra=--refit)')
    parser.add_argument("--tag", default="", help="keep these cases apart in the results (scale_TAG.json)")
    parser.add_argument("--generate-layers", type=int, default=32,
                        help="layers of the generated model (fewer: less disk, for shallow cases only)")
    args = parser.parse_args()
    results_file = RESULTS.with_name(f"scale_{args.tag}.json") if args.tag else RESULTS

    full = args.scratch / f"llama-7b-shape-{args.generate_layers}"
    start = time.monotonic()
    generate(full, layers=args.generate_layers)
    print(f"model ready in {full} ({time.monotonic() - start:.0f} s)", file=sys.stderr)
    results = json.loads(results_file.read_text()) if results_file.exists() else {"cases": {}}
    for layers in [int(n) for n in args.layers.split(",")]:
        model = full if layers == args.generate_layers else cut(full, layers, args.scratch / f"cut-{layers}")
        out = args.scratch / f"sliced-{layers}"
        print(f"slicing {layers} layers ...", file=sys.stderr, flush=True)
        case = slice_case(model, out, args)
        case.update(layers=layers, cal=f"{args.cal_samples}x{args.cal_seqlen}", dtype=args.dtype, threads=args.threads,
                    options=args.extra)
        results["cases"][str(layers)] = case
        if not args.keep_output:
            shutil.rmtree(out)
        print(f"  {layers} layers: peak RSS {case['peak_rss_gib']:.2f} GiB, {case['calibrate_and_slice_s']:.0f} s",
              file=sys.stderr, flush=True)
    results["estimate_32_layers_s"] = estimate(results["cases"])
    results["model"] = {"shape": SHAPE, "dtype": "float16", "disk_gib": round(
        sum(p.stat().st_size for p in full.glob("*.safetensors")) / 2**30, 2)}
    results["torch"] = torch.__version__
    harness.write_json(results_file, results)
    print_table(results)


def estimate(cases: dict) -> float | None:
    """Time for 32 layers from a linear fit of time against depth (two or more depths)."""
    points = sorted((c["layers"], c["calibrate_and_slice_s"]) for c in cases.values())
    if len(points) < 2:
        return None
    (l0, t0), (l1, t1) = points[0], points[-1]
    per_layer = (t1 - t0) / (l1 - l0)
    return round(t0 + (32 - l0) * per_layer, 0)


def print_table(results: dict) -> None:
    print(f"{'layers':>6} {'cal':>8} {'peak RSS GiB':>12} {'slice s':>8} {'s/layer':>8} {'output GiB':>10} "
          f"{'params dense':>14} {'params sliced':>14}")
    for key in sorted(results["cases"], key=int):
        c = results["cases"][key]
        print(f"{c['layers']:>6} {c['cal']:>8} {c['peak_rss_gib']:>12.2f} {c['calibrate_and_slice_s']:>8.0f} "
              f"{c['calibrate_and_slice_s'] / c['layers']:>8.1f} {c['output_gib']:>10.2f} "
              f"{c['params']['dense']:>14,} {c['params']['sliced']:>14,}")
    if results.get("estimate_32_layers_s"):
        print(f"  estimated 32 layers: {results['estimate_32_layers_s'] / 60:.0f} min (linear in depth)")


if __name__ == "__main__":
    main()
