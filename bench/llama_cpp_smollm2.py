"""SmolLM2-135M in llama.cpp: exported dense and sliced models at F32/F16/Q8_0/Q4_0.

For the dense model and two slices with one basis (`--sparsity 0.25` and `--target-ratio
0.85`, both `--round-to 32` so every width fits the 32-blocks of Q8_0/Q4_0), each exported
with `slicegpt export --format gguf` (quantized by llama.cpp's own quantizer):
- logits: llama.cpp's logits on the first 512 tokens of WikiText-2 test against
  transformers' (F32 and F16 files), the tokenization compared, a greedy continuation;
- perplexity in llama.cpp on the first chunks of 2048 WikiText-2 test tokens (the
  project's protocol; 4 chunks by default, to keep the run short), next to transformers'
  (float32) on the same tokens;
- file size and batch-1 prefill/decode tokens/s with 2 threads, models in turns, medians.

transformers runs here; llama.cpp runs in another Python that has llama-cpp-python
(`--llama-python`), through bench/llama_cpp_measure.py, which needs no torch. Every step
keeps its result in the scratch directory, so an interrupted run resumes.

    python bench/llama_cpp_smollm2.py --llama-python /path/to/llama-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import harness

SLICES = {"25%": ["--sparsity", "0.25"], "0.85x": ["--target-ratio", "0.85"]}
TYPES = ["F32", "F16", "Q8_0", "Q4_0"]
PROMPT = "The capital of France is"


def cached(path: Path, compute):
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    path.write_text(json.dumps(result, indent=2))
    return result


def make_slice(name: str, scratch: Path, threads: int) -> Path:
    out = scratch / f"{harness.MODEL}-{name.replace('%', '').replace('.', '')}"
    if not (out / "config.json").is_file():
        print(f"slicing {name} ...", file=sys.stderr, flush=True)
        harness.run_slicegpt("slice", harness.MODEL, *SLICES[name], "--round-to", "32", "--cal-data",
                             str(harness.CAL_DATA), "--cal-samples", str(harness.CAL_SAMPLES), "--cal-seqlen",
                             str(harness.CAL_SEQLEN), "--out", str(out), "--overwrite", "--threads", str(threads))
    return out


def export(source: Path, out: Path, kind: str, llama_python: str) -> dict:
    """F32/F16 through `slicegpt export`; quantized types from the F16 file through the quantizer that
    `slicegpt export --quantize` calls (the same function, without loading the model again)."""
    if kind in ("F32", "F16"):
        args = ["export", str(source), "--format", "gguf", "--out", str(out), "--json", "--overwrite",
                "--outtype", kind.lower()]
        result = json.loads(harness.run_slicegpt(*args))
        result["fallbacks"] = len(result["fallbacks"])
        return result
    import gguf

    from slicegpt.io.llama_quantize import quantize_gguf, width_misfits

    f16 = out.with_name(out.name.replace(kind, "F16"))
    base = json.loads(f16.with_suffix(".export.json").read_text())
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in gguf.GGUFReader(f16).tensors}
    quantize_gguf(f16, out, kind, llama_python, threads=2)
    return {**base, "out": str(out), "bytes": out.stat().st_size, "type": kind,
            "fallbacks": len(width_misfits(shapes, kind))}


def measure(job: dict, scratch: Path, llama_python: str, tag: str) -> dict:
    return harness.run_job(llama_python, "llama_cpp_measure.py", job, scratch / f"job-{tag}.json",
                           scratch / f"result-{tag}.json")


def references(sources: dict[str, Path], scratch: Path, excerpt: int, chunks: int, threads: int) -> dict:
    """Token ids, transformers' logits on the excerpt and perplexity on the chunks, per model."""
    import numpy as np
    import torch

    from slicegpt.evaluation.perplexity import perplexity
    from slicegpt.io.data import load_texts, tokenize_joined
    from slicegpt.io.models import load_model

    torch.set_num_threads(threads)
    texts = load_texts(str(harness.WIKITEXT_TEST), split="test")
    out = {}
    for name, source in sources.items():
        def compute():
            model, tokenizer = load_model(str(source))
            stream = tokenize_joined(tokenizer, texts)
            ids_file = scratch / "wikitext_test_ids.json"
            ids_file.write_text(json.dumps(stream[: chunks * 2048].tolist()))
            ids = stream[:excerpt]
            (scratch / "excerpt_ids.json").write_text(json.dumps(ids.tolist()))
            (scratch / "excerpt.txt").write_text(tokenizer.decode(ids))
            with torch.no_grad():
                logits = model(ids[None]).logits[0].float().numpy()
            np.save(scratch / f"logits-{name}.npy", logits)
            ppl = perplexity(model, tokenizer, texts, seqlen=2048, chunks=chunks, progress=False)
            return {"ppl_transformers": ppl["ppl"], "chunks": ppl["chunks"], "logits": str(scratch / f"logits-{name}.npy")}
        out[name] = cached(scratch / f"reference-{name.replace('%', '')}.json", compute)
    return out


def main() -> None:
    from slicegpt.io.models import resolve

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-python", required=True, help="a Python with llama-cpp-python")
    parser.add_argument("--scratch", type=Path, default=Path("/work/scratch/llama_cpp"))
    parser.add_argument("--slice-dirs", default=None, help="NAME=DIR,... existing slices instead of slicing")
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--excerpt", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=harness.THREADS,
                        help="for slicing, logits and perplexity (speed: always 2)")
    parser.add_argument("--steps", default="logits,ppl,speed")
    parser.add_argument("--models", default="dense,25%,0.85x")
    parser.add_argument("--out", type=Path, default=harness.RESULTS / "llama_cpp.json")
    args = parser.parse_args()
    args.scratch.mkdir(parents=True, exist_ok=True)
    steps = args.steps.split(",")

    given = dict(item.split("=", 1) for item in args.slice_dirs.split(",")) if args.slice_dirs else {}
    sources = {"dense": Path(resolve(harness.MODEL))}
    for name in SLICES:
        sources[name] = Path(given[name]) if name in given else make_slice(name, args.scratch, args.threads)
    sources = {name: source for name, source in sources.items() if name in args.models.split(",")}
    files = {}
    for name, source in sources.items():
        for kind in TYPES:
            path = args.scratch / f"smollm2-135m-{name.replace('%', '')}-{kind}.gguf"
            files[name, kind] = cached(path.with_suffix(".export.json"),
                                       lambda: export(source, path, kind, args.llama_python))
    refs = references(sources, args.scratch, args.excerpt, args.chunks, args.threads)
    text = (args.scratch / "excerpt.txt").read_text()
    data = {"command": "python bench/llama_cpp_smollm2.py " + " ".join(sys.argv[1:]), "rows": [], "logits": [],
            "load_average_1_5_15": harness.load_average()}
    for (name, kind), exported in files.items():
        tag = f"{name.replace('%', '')}-{kind}"
        row = {"model": name, "type": kind, "bytes": exported["bytes"], "params": exported["params"],
               "hidden_size": exported["hidden_size"], "fallback_matrices": exported["fallbacks"],
               "ppl_transformers_f32": refs[name]["ppl_transformers"],
               "ppl_transformers_chunks": refs[name]["chunks"]}
        logits_file = args.scratch / f"logits-{tag}.json"
        if ("logits" in steps or logits_file.is_file()) and kind in ("F32", "F16"):
            job = {"kind": "logits", "model": exported["out"], "ids": str(args.scratch / "excerpt_ids.json"),
                   "reference_logits": refs[name]["logits"], "text": text, "prompt": PROMPT, "new_tokens": 24,
                   "threads": args.threads}
            result = cached(logits_file, lambda: measure(job, args.scratch,
                                                                                 args.llama_python, f"logits-{tag}"))
            data["logits"].append({"model": name, "type": kind, **result})
        ppl_file = args.scratch / f"ppl-{tag}.json"
        if ("ppl" in steps or ppl_file.is_file()) and kind != "F32":  # F32 is checked by its logits
            job = {"kind": "ppl", "model": exported["out"], "ids": str(args.scratch / "wikitext_test_ids.json"),
                   "seqlen": 2048, "chunks": args.chunks, "threads": args.threads}
            result = cached(ppl_file, lambda: measure(job, args.scratch,
                                                                              args.llama_python, f"ppl-{tag}"))
            row["ppl_llama_cpp"] = result["ppl"]
            row["ppl_llama_cpp_chunks"] = result["chunks"]
        data["rows"].append(row)
    if "speed" in steps:
        models = {f"{name} {kind}": files[name, kind]["out"] for name in sources for kind in TYPES if kind != "F32"}
        models = {"dense F16": models.pop("dense F16"), **models}  # ratios against dense F16
        job = {"kind": "speed", "models": models, "ids": str(args.scratch / "wikitext_test_ids.json"),
               "prompt_len": 128, "new_tokens": 64, "repeats": args.repeats, "threads": 2}
        speed = cached(args.scratch / "speed.json", lambda: measure(job, args.scratch, args.llama_python, "speed"))
        data["speed"] = speed
        for row in data["rows"]:
            key = f"{row['model']} {row['type']}"
            if key in speed["median"]:
                row.update({f"{k}_tokens_per_s": v for k, v in speed["median"][key].items()})
                row["decode_vs_dense_f16"] = speed["paired_ratio_vs_dense F16"][key]["decode"]
    harness.write_json(args.out, data)
    print_tables(data)
    print(f"wrote {args.out}")


def print_tables(data: dict) -> None:
    print(f"{'model':>6} {'type':>7} {'bytes':>12} {'ppl llama.cpp':>13} {'ppl HF f32':>10} "
          f"{'prefill t/s':>11} {'decode t/s':>10} {'decode x':>8} {'fallbacks':>9}")
    for r in data["rows"]:
        print(f"{r['model']:>6} {r['type']:>7} {r['bytes']:>12,} {r.get('ppl_llama_cpp', float('nan')):>13.3f} "
              f"{r['ppl_transformers_f32']:>10.3f} {r.get('prefill_tokens_per_s', float('nan')):>11.1f} "
              f"{r.get('decode_tokens_per_s', float('nan')):>10.1f} {r.get('decode_vs_dense_f16', float('nan')):>7.3f}x "
              f"{r['fallback_matrices']:>9}")
    for r in data["logits"]:
        print(f"logits {r['model']} {r['type']}: max |diff| {r['max_abs_diff']:.2e} (max |logit| "
              f"{r['max_abs_reference']:.1f}), top-1 agreement {r['top1_agreement']:.4f}, NLL {r['nll_llama_cpp']:.4f} "
              f"vs {r['nll_transformers']:.4f}, tokenization matches: {r['tokenization_matches']}; "
              f"greedy: {r['generated_text']!r}")


if __name__ == "__main__":
    main()
