"""llama.cpp decode speed at an untied 1B shape: dense against sliced, F16 and quantized.

A random Llama with TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads, 4 KV heads,
intermediate 5632, untied head; the vocabulary is SmolLM2's 49152 so the export carries a
real tokenizer) in float16. Speed does not depend on the weights' values, so the slices
calibrates cheaply (4 x 128 tokens of WikiText-2, streaming, float16): `--sparsity 0.25
--rotations model --round-to 256`, so every width fits the K-quants' 256-blocks (1536
wide; `--target-ratio 0.85` rounds down to the same 1536 at this block, so it is left out
by default). Every model is exported with `slicegpt export --format gguf`
(F16, Q8_0, Q4_K_M by llama.cpp's quantizer) and timed in llama.cpp with 2 threads at
batch 1, models in turns within each repeat, medians (bench/llama_cpp_measure.py).

    python bench/llama_cpp_1b.py --llama-python /path/to/llama-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import harness

SLICES = {"25%": ["--sparsity", "0.25"], "0.85x": ["--target-ratio", "0.85"]}
TYPES = ["F16", "Q8_0", "Q4_K_M"]


def make_dense(out: Path) -> Path:
    import torch
    import transformers

    from slicegpt.io.models import resolve

    if (out / "config.json").is_file():
        return out
    tokenizer = transformers.AutoTokenizer.from_pretrained(resolve(harness.MODEL))
    config = transformers.LlamaConfig(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                                      num_key_value_heads=4, intermediate_size=5632, vocab_size=len(tokenizer),
                                      max_position_embeddings=2048, tie_word_embeddings=False,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)
    model = transformers.LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_slice(dense: Path, name: str, scratch: Path) -> Path:
    out = scratch / f"tinyllama-shape-{name.replace('%', '').replace('.', '')}"
    if not (out / "config.json").is_file():
        print(f"slicing {name} ...", file=sys.stderr, flush=True)
        harness.run_slicegpt("slice", str(dense), *SLICES[name], "--rotations", "model", "--round-to", "256",
                             "--streaming", "--dtype", "float16", "--cal-data", str(harness.CAL_DATA), "--cal-samples",
                             "4", "--cal-seqlen", "128", "--cal-batch-size", "2", "--out", str(out), "--overwrite",
                             "--threads", "2")
    return out


def export(source: Path, out: Path, kind: str, llama_python: str) -> dict:
    """F16 through `slicegpt export`; quantized types from that F16 file through the quantizer that
    `slicegpt export --quantize` calls (the same function, without loading the model again)."""
    record = out.with_suffix(".export.json")
    if record.is_file():
        return json.loads(record.read_text())
    if kind == "F16":
        result = json.loads(harness.run_slicegpt("export", str(source), "--format", "gguf", "--out", str(out),
                                                 "--json", "--overwrite", "--dtype", "float16"))
    else:
        import gguf

        from slicegpt.io.llama_quantize import quantize_gguf, width_misfits

        f16 = out.with_name(out.name.replace(kind, "F16"))
        base = json.loads(f16.with_suffix(".export.json").read_text())
        shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in gguf.GGUFReader(f16).tensors}
        quantize_gguf(f16, out, kind, llama_python, threads=2)
        result = {**base, "out": str(out), "bytes": out.stat().st_size, "type": kind,
                  "fallbacks": width_misfits(shapes, kind)}
    record.write_text(json.dumps(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-python", required=True, help="a Python with llama-cpp-python")
    parser.add_argument("--scratch", type=Path, default=Path("/work/scratch/llama_cpp_1b"))
    parser.add_argument("--slices", default="25%")
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--timed", default=None,
                        help="time only these models, e.g. 'dense F16,25%% F16' (all loaded at once must fit memory)")
    parser.add_argument("--prepare-only", action="store_true",
                        help="make, slice and export the models, time nothing (run this part under nice)")
    parser.add_argument("--out", type=Path, default=harness.RESULTS / "llama_cpp_1b.json")
    args = parser.parse_args()
    args.scratch.mkdir(parents=True, exist_ok=True)
    types = args.types.split(",")

    dense = make_dense(args.scratch / "tinyllama-shape-dense")
    sources = {"dense": dense, **{name: make_slice(dense, name, args.scratch) for name in args.slices.split(",")}}
    files = {(name, kind): export(source, args.scratch / f"{source.name}-{kind}.gguf", kind, args.llama_python)
             for name, source in sources.items() for kind in types}
    if args.prepare_only:
        return
    ids = args.scratch / "prompt_ids.json"
    ids.write_text(json.dumps(list(range(1000, 1000 + args.prompt_len))))  # speed does not depend on the tokens
    timed = args.timed.split(",") if args.timed else [f"{n} {k}" for n, k in files]
    files = {(n, k): f for (n, k), f in files.items() if f"{n} {k}" in timed}
    job = {"kind": "speed", "models": {f"{n} {k}": f["out"] for (n, k), f in files.items()}, "ids": str(ids),
           "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats, "threads": 2}
    speed = harness.run_job(args.llama_python, "llama_cpp_measure.py", job, args.scratch / "job-speed.json",
                            args.scratch / f"result-speed-{args.out.stem}.json")
    first = next(iter(job["models"]))
    rows = []
    for (name, kind), exported in files.items():
        key = f"{name} {kind}"
        rows.append({"model": name, "type": kind, "bytes": exported["bytes"], "params": exported["params"],
                     "hidden_size": exported["hidden_size"], "fallback_matrices": len(exported["fallbacks"]),
                     **{f"{k}_tokens_per_s": v for k, v in speed["median"][key].items()},
                     **{f"{k}_vs_{first}": v for k, v in speed[f"paired_ratio_vs_{first}"][key].items()}})
    data = {"command": "python bench/llama_cpp_1b.py " + " ".join(sys.argv[1:]), "rows": rows, "speed": speed,
            "load_average_1_5_15": harness.load_average()}
    harness.write_json(args.out, data)
    print(f"{'model':>6} {'type':>7} {'hidden':>6} {'bytes':>14} {'prefill t/s':>11} {'decode t/s':>10} "
          f"{'decode x':>8} {'prefill x':>9}")
    for r in rows:
        print(f"{r['model']:>6} {r['type']:>7} {r['hidden_size']:>6} {r['bytes']:>14,} "
              f"{r['prefill_tokens_per_s']:>11.1f} {r['decode_tokens_per_s']:>10.2f} "
              f"{r[f'decode_vs_{first}']:>7.3f}x {r[f'prefill_vs_{first}']:>8.3f}x")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
