"""Gemma 3 270M on protocol P's data and settings: dense, --target-ratio 0.85, --sparsity 0.25 (two layouts).

gemma3-270m (the Q4_K_M GGUF, dequantised to float32), 2 threads, seed 42, calibration
64 x 2048 tokens of WikiText-2 (v1) validation, perplexity on the first 16 chunks of
WikiText-2 raw test. Each configuration runs in its own process and appends one row to
the results file as soon as it finishes, so an interrupted run resumes where it stopped
(rows already there are kept; --fresh starts over). The cost baseline, one plain dense
forward of the model body over the calibration tokens, is timed in the process of the
first configuration, right before it slices.

    python bench/gemma3.py            # every configuration not yet in the file
    python bench/gemma3.py --quick    # a smoke run with tiny settings (gemma3_quick.json)
Writes bench/results/gemma3.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol_p import CAL_DATA, PPL_DATA, ROOT, SECOND_CORPUS, dense_body_forward_s, peak_rss_gib  # noqa: E402

MODEL = "gemma3-270m"
# name -> SliceConfig settings; the first also measures the dense model. MEAN_SCALE is the
# alternative to the exact post-norm maps: each post-norm's scale replaced by its mean (the
# one scale that commutes with a rotation), measured on the dense model, before any slicing.
MEAN_SCALE = "dense-mean-post-norm-scale"
# Gemma 3 270M is 63% embedding (262,144 x 640, tied), so `--widths embedding` (slice only
# the embeddings and the tied head; every layer keeps its width and weights) is measured too.
CONFIGS = {
    "embedding-ratio-0.85": dict(target_ratio=0.85, widths="embedding"),
    "embedding-sparsity-0.25": dict(sparsity=0.25, widths="embedding"),
    "block-ratio-0.85": dict(target_ratio=0.85, widths="uniform"),  # per-block bases, every point sliced
    "block-sparsity-0.25": dict(sparsity=0.25, widths="uniform"),
    MEAN_SCALE: None,
}


@torch.no_grad()
def mean_scale_run(args) -> dict:
    from slicegpt import load_model, perplexity
    from slicegpt.io.data import load_texts

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(MODEL)
    spread = []
    for name, module in model.named_modules():
        if name.endswith(("post_attention_layernorm", "post_feedforward_layernorm")):
            scale = 1.0 + module.weight.double()
            spread.append((scale.std() / scale.mean().abs()).item())
            module.weight.fill_(scale.mean().item() - 1.0)
    ppl = perplexity(model, tokenizer, load_texts(str(PPL_DATA)), chunks=args.ppl_chunks, progress=False)["ppl"]
    return {"config": MEAN_SCALE, "ppl": ppl, "post_norm_scale_cv_min": min(spread),
            "post_norm_scale_cv_max": max(spread)}


def one_run(name: str, args) -> dict:
    """Everything measured for one configuration, in this process."""
    from slicegpt import SliceConfig, load_model, perplexity, slice_model

    if name == MEAN_SCALE:
        return mean_scale_run(args)
    from slicegpt.architectures.families import family_for
    from slicegpt.io.data import load_texts
    from slicegpt.running.in_memory import calibration_data
    from slicegpt.sizing.counts import count_parameters, head_parameters, shortcut_parameters

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(MODEL)
    family = family_for(model)
    config = SliceConfig(**CONFIGS[name], cal_samples=args.cal_samples, cal_seqlen=args.cal_seqlen,
                         cal_batch_size=args.cal_batch_size, seed=42)
    batches = calibration_data(tokenizer, config, load_texts(str(CAL_DATA)))
    ppl_texts = load_texts(str(PPL_DATA))
    row = {"config": name, "settings": CONFIGS[name], "params_dense": count_parameters(model)}
    second_texts = load_texts(str(SECOND_CORPUS))
    if args.dense:
        row["ppl_dense"] = perplexity(model, tokenizer, ppl_texts, chunks=args.ppl_chunks, progress=False)["ppl"]
        row["ppl_lambada_dense"] = perplexity(model, tokenizer, second_texts, chunks=args.ppl_chunks,
                                              progress=False)["ppl"]
        row["dense_forward_s"] = dense_body_forward_s(model, batches)
    start = time.perf_counter()
    slice_model(model, tokenizer, config, batches, progress=False)
    row["calibrate_and_slice_s"] = time.perf_counter() - start
    row["ppl_sliced"] = perplexity(model, tokenizer, ppl_texts, chunks=args.ppl_chunks, progress=False)["ppl"]
    row["ppl_lambada_sliced"] = perplexity(model, tokenizer, second_texts, chunks=args.ppl_chunks,
                                           progress=False)["ppl"]
    slicing = model.config.slicing
    row["rotations"], row["pca"] = slicing["config"]["rotations"], slicing["config"]["pca"]
    row["widths"] = slicing["config"]["widths"]
    row["width"] = slicing["embedding_width"]
    row["params_sliced"] = count_parameters(model)
    row["params_shortcuts"] = shortcut_parameters(model)
    row["params_head"] = head_parameters(model, family)
    row["params_post_norm_maps"] = sum(p.numel() for n, p in model.named_parameters()
                                       if "_feedforward_layernorm.map." in n or "post_attention_layernorm.map." in n)
    row["peak_rss_gib"] = peak_rss_gib()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings, to check the script runs")
    parser.add_argument("--fresh", action="store_true", help="drop the rows already measured")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", help="comma-separated configurations, written to gemma3_<first>.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration
    parser.add_argument("--dense", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cal-samples", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--cal-seqlen", type=int, default=2048, help=argparse.SUPPRESS)
    parser.add_argument("--cal-batch-size", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--ppl-chunks", type=int, default=16, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.one, args)))
        return

    names = args.only.split(",") if args.only else list(CONFIGS)
    tag = f"_{names[0]}" if args.only else ""
    out = ROOT / "bench" / "results" / f"gemma3{tag}{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [] if args.fresh or not out.exists() else json.loads(out.read_text())["rows"]
    sizes = ["--cal-samples", "2", "--cal-seqlen", "128", "--ppl-chunks", "1"] if args.quick else []
    for name in names:
        if any(row["config"] == name for row in rows):
            continue
        command = [sys.executable, __file__, "--one", name, "--threads", str(args.threads),
                   *(["--dense"] if name == next(iter(CONFIGS)) else []), *sizes]
        print(f"running {name} ...", file=sys.stderr, flush=True)
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(done.stderr)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        save(out, rows, args)
    summary = summarise(rows)
    save(out, rows, args, summary)
    print_table(rows, summary)
    print(f"wrote {out.relative_to(ROOT)}")


def save(out: Path, rows: list[dict], args, summary: dict | None = None) -> None:
    out.write_text(json.dumps({"protocol": "P", "model": MODEL, "quick": args.quick, "threads": args.threads,
                               "rows": rows, "summary": summary or {}, "torch": torch.__version__}, indent=2) + "\n")


def summarise(rows: list[dict]) -> dict:
    dense = next((r for r in rows if "ppl_dense" in r), None)
    summary = {}
    for r in rows:
        if r["config"] == MEAN_SCALE:
            if dense is not None:
                summary[f"ppl_ratio_{MEAN_SCALE}"] = r["ppl"] / dense["ppl_dense"]
            continue
        name = r["config"]
        summary[f"params_ratio_{name}"] = r["params_sliced"] / r["params_dense"]
        if dense is not None:
            summary[f"ppl_ratio_{name}"] = r["ppl_sliced"] / dense["ppl_dense"]
            if "ppl_lambada_dense" in dense and "ppl_lambada_sliced" in r:
                summary[f"lambada_ratio_{name}"] = r["ppl_lambada_sliced"] / dense["ppl_lambada_dense"]
            summary[f"cost_ratio_{name}"] = r["calibrate_and_slice_s"] / dense["dense_forward_s"]
            summary[f"target_met_{name}"] = (summary[f"params_ratio_{name}"] <= 0.85
                                             and summary[f"ppl_ratio_{name}"] <= 1.8
                                             and summary[f"cost_ratio_{name}"] <= 2.0)
    return summary


def print_table(rows: list[dict], summary: dict) -> None:
    print(f"{'config':>23} {'rotations':>9} {'width':>5} {'ppl dense':>10} {'ppl sliced':>10} {'slice s':>8} "
          f"{'dense fwd s':>11} {'params':>12} {'x dense':>7} {'post maps':>10} {'peak GiB':>8}")
    for r in rows:
        if r["config"] == MEAN_SCALE:
            print(f"{r['config']}: ppl {r['ppl']:.2f} (post-norm scale CV {r['post_norm_scale_cv_min']:.2f} to "
                  f"{r['post_norm_scale_cv_max']:.2f})")
            continue
        print(f"{r['config']:>23} {r['rotations']:>9} {r['width']:>5} {r.get('ppl_dense', float('nan')):>10.2f} "
              f"{r['ppl_sliced']:>10.2f} {r['calibrate_and_slice_s']:>8.1f} "
              f"{r.get('dense_forward_s', float('nan')):>11.1f} {r['params_sliced']:>12,} "
              f"{r['params_sliced'] / r['params_dense']:>7.3f} {r['params_post_norm_maps']:>10,} "
              f"{r['peak_rss_gib']:>8.2f}")
    for key, value in summary.items():
        print(f"  {key}: {value:.3f}" if isinstance(value, float) else f"  {key}: {value}")


if __name__ == "__main__":
    main()
