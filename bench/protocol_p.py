"""Protocol P: SmolLM2-135M sliced at 20/25/30%, quality, cost, memory and size.

smollm2-135m, 2 threads, seed 42, calibration 64 x 2048 tokens of WikiText-2 (v1)
validation, perplexity on the first 16 chunks of WikiText-2 raw test and, as text unlike
the calibration corpus, on the first 16 chunks of the LAMBADA (OpenAI) test passages joined
the same way. Each sparsity
runs in its own process, so peak RSS is that run's own. The cost baseline, one plain
dense forward of the model body over the same calibration tokens, is timed in the
same process right before slicing.

    python bench/protocol_p.py                # the full protocol (about half an hour)
    python bench/protocol_p.py --quick        # a smoke run with tiny settings
    python bench/protocol_p.py --sparsities 0.25 --variant refit=true --tag refit
    python bench/protocol_p.py --sparsities 0.25 --variant refit=true --refit-damping 0.1 --tag refit_d01
Writes bench/results/protocol_p[_TAG].json (or protocol_p_quick.json) and prints a table.
Each finished sparsity is written at once; a rerun skips the sparsities already there.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
CAL_DATA = DATA / "wikitext-2-v1.validation.jsonl"
PPL_DATA = DATA / "wikitext-2-raw-v1.test.jsonl"
SECOND_CORPUS = ROOT.parent / "shared" / "data" / "lambada" / "lambada_openai.test.jsonl"
ORIGINAL = {  # the original implementation on this protocol (a reference figure, not rerun here)
    "dense_ppl": 20.71, "sliced_ppl": {"0.2": 43.95, "0.25": 52.21, "0.3": 66.18},
    "slice_s_25": 718.0, "dense_forward_s": 342.0, "params_25": 140.65e6, "params_dense": 134.52e6,
}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def dense_body_forward_s(model, batches, device: str = "cpu") -> float:
    body = model.get_decoder()
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    _sync(device)
    start = time.perf_counter()
    for batch in batches:
        body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    _sync(device)
    return time.perf_counter() - start


def one_run(args) -> dict:
    """Everything measured for one sparsity, in this process."""
    from slicegpt import SliceConfig, load_model, perplexity, slice_model
    from slicegpt.running.in_memory import calibration_data
    from slicegpt.io.data import load_texts
    from slicegpt.architectures.families import family_for
    from slicegpt.sizing.counts import count_parameters, head_parameters, shortcut_parameters

    torch.set_num_threads(args.threads)
    if args.refit_damping is not None:  # the refit's ridge weight (method/least_squares.DAMPING)
        from slicegpt.method import refit

        refit.DAMPING = args.refit_damping
    model, tokenizer = load_model("smollm2-135m", device=args.device)
    family = family_for(model)
    config = SliceConfig(sparsity=args.sparsity, cal_samples=args.cal_samples, cal_seqlen=args.cal_seqlen,
                         cal_batch_size=args.cal_batch_size or SliceConfig.cal_batch_size, seed=42, **parse_variant(args.variant))
    batches = calibration_data(tokenizer, config, load_texts(str(CAL_DATA)))
    ppl_texts = load_texts(str(PPL_DATA))
    second_texts = load_texts(str(SECOND_CORPUS)) if SECOND_CORPUS.is_file() else None
    row = {"sparsity": args.sparsity, "variant": args.variant, "params_dense": count_parameters(model)}
    if args.refit_damping is not None:
        row["refit_damping"] = args.refit_damping
    if args.dense:
        row["ppl_dense"] = perplexity(model, tokenizer, ppl_texts, chunks=args.ppl_chunks, progress=False)["ppl"]
        if second_texts:
            row["ppl_lambada_dense"] = perplexity(model, tokenizer, second_texts, chunks=args.ppl_chunks,
                                                  progress=False)["ppl"]
    if args.baseline:
        row["dense_forward_s"] = dense_body_forward_s(model, batches, args.device)
    _sync(args.device)
    start = time.perf_counter()
    slice_model(model, tokenizer, config, batches, progress=False)
    _sync(args.device)
    row["calibrate_and_slice_s"] = time.perf_counter() - start
    row["ppl_sliced"] = perplexity(model, tokenizer, ppl_texts, chunks=args.ppl_chunks, progress=False)["ppl"]
    if second_texts:
        row["ppl_lambada_sliced"] = perplexity(model, tokenizer, second_texts, chunks=args.ppl_chunks,
                                               progress=False)["ppl"]
    row["params_sliced"] = count_parameters(model)
    row["params_shortcuts"] = shortcut_parameters(model)
    row["params_head"] = head_parameters(model, family)
    row["peak_rss_gib"] = peak_rss_gib()
    if args.device.startswith("cuda"):
        row["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def parse_variant(spec: str) -> dict:
    """SliceConfig settings from "key=value,key=value" (true/false and numbers parsed)."""
    settings = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        lowered = value.lower()
        if lowered in ("true", "false"):
            settings[key] = lowered == "true"
        else:
            try:
                settings[key] = float(value) if "." in value else int(value)
            except ValueError:
                settings[key] = value
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings, to check the script runs")
    parser.add_argument("--sparsities", default="0.2,0.25,0.3")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (results go to protocol_p_cuda.json)")
    parser.add_argument("--variant", default="", help="SliceConfig settings, e.g. refit=true,rotations=block")
    parser.add_argument("--tag", default="", help="results go to protocol_p_TAG.json")
    parser.add_argument("--no-dense", action="store_true",
                        help="measure only the sliced model (no dense perplexity or dense forward time)")
    parser.add_argument("--no-dense-ppl", action="store_true",
                        help="time the dense forward but skip the dense perplexities (known from other runs)")
    parser.add_argument("--refit-damping", type=float, default=None,
                        help="the refit's ridge weight, relative to the mean diagonal (default: the library's)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: run one sparsity
    parser.add_argument("--sparsity", type=float, default=0.25, help=argparse.SUPPRESS)
    parser.add_argument("--dense", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cal-samples", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--cal-seqlen", type=int, default=2048, help=argparse.SUPPRESS)
    parser.add_argument("--cal-batch-size", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ppl-chunks", type=int, default=16, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args)))
        return

    sizes = ["--cal-samples", "4", "--cal-seqlen", "256", "--ppl-chunks", "1"] if args.quick else []
    suffix = ("_quick" if args.quick else "") + ("" if args.device == "cpu" else "_" + args.device.split(":")[0])
    suffix += f"_{args.tag}" if args.tag else ""
    out = ROOT / "bench" / "results" / f"protocol_p{suffix}.json"
    rows = json.loads(out.read_text())["rows"] if out.is_file() else []
    for sparsity in [float(s) for s in args.sparsities.split(",")]:
        if any(r["sparsity"] == sparsity and r.get("variant", "") == args.variant for r in rows):
            print(f"sparsity {sparsity}: already measured in {out.relative_to(ROOT)}", file=sys.stderr)
            continue
        flags = ["--dense", "--baseline"] if sparsity == 0.25 and not args.no_dense else []
        if args.no_dense_ppl:
            flags = [flag for flag in flags if flag != "--dense"]
        command = [sys.executable, __file__, "--one", "--sparsity", str(sparsity), "--threads", str(args.threads),
                   "--device", args.device, "--variant", args.variant, *flags, *sizes]
        if args.refit_damping is not None:
            command += ["--refit-damping", str(args.refit_damping)]
        print(f"running sparsity {sparsity} ...", file=sys.stderr, flush=True)
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(done.stderr)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        write_results(out, args, rows)

    print_table(rows, summarise(rows))
    print(f"wrote {out.relative_to(ROOT)}")


def write_results(out: Path, args, rows: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"protocol": "P", "quick": args.quick, "threads": args.threads, "device": args.device,
                               "rows": rows, "summary": summarise(rows), "original": ORIGINAL,
                               "torch": torch.__version__}, indent=2) + "\n")


def summarise(rows: list[dict]) -> dict:
    main_row = next((r for r in rows if r["sparsity"] == 0.25), rows[0])
    summary = {}
    if "ppl_dense" in main_row:
        summary["ppl_ratio_25"] = main_row["ppl_sliced"] / main_row["ppl_dense"]
        summary["ppl_target_met"] = main_row["ppl_sliced"] <= 52.2 or summary["ppl_ratio_25"] <= 2.52
    if "ppl_lambada_dense" in main_row and "ppl_lambada_sliced" in main_row:
        summary["lambada_ratio_25"] = main_row["ppl_lambada_sliced"] / main_row["ppl_lambada_dense"]
    if "dense_forward_s" in main_row:
        summary["cost_ratio_25"] = main_row["calibrate_and_slice_s"] / main_row["dense_forward_s"]
        summary["cost_target_1_5_met"] = summary["cost_ratio_25"] <= 1.5
    summary["params_ratio_25"] = main_row["params_sliced"] / main_row["params_dense"]
    return summary


def print_table(rows: list[dict], summary: dict) -> None:
    print(f"{'sparsity':>8} {'ppl dense':>10} {'ppl sliced':>10} {'slice s':>8} {'dense fwd s':>11} "
          f"{'params':>12} {'shortcuts':>10} {'head':>10} {'peak GiB':>8}")
    for r in rows:
        print(f"{r['sparsity']:>8.2f} {r.get('ppl_dense', float('nan')):>10.2f} {r['ppl_sliced']:>10.2f} "
              f"{r['calibrate_and_slice_s']:>8.1f} {r.get('dense_forward_s', float('nan')):>11.1f} "
              f"{r['params_sliced']:>12,} {r['params_shortcuts']:>10,} {r['params_head']:>10,} "
              f"{r['peak_rss_gib']:>8.2f}")
    for r in rows:
        if "ppl_lambada_sliced" in r:
            print(f"  LAMBADA passages at {r['sparsity']:.2f}: dense {r.get('ppl_lambada_dense', float('nan')):.2f}, "
                  f"sliced {r['ppl_lambada_sliced']:.2f}")
    for key, value in summary.items():
        print(f"  {key}: {value:.3f}" if isinstance(value, float) else f"  {key}: {value}")
    print(f"  original at 25%: ppl {ORIGINAL['sliced_ppl']['0.25']}, {ORIGINAL['params_25'] / 1e6:.2f}M params, "
          f"slice {ORIGINAL['slice_s_25']:.0f} s = {ORIGINAL['slice_s_25'] / ORIGINAL['dense_forward_s']:.2f}x forward")


if __name__ == "__main__":
    main()
