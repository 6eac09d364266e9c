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
import sys

import torch

import harness

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
CAL_BATCH_SIZE = 8
QUICK = {"cal_samples": 2, "cal_seqlen": 128, "ppl_chunks": 1}  # --quick: a smoke run


@torch.no_grad()
def mean_scale_run(ppl_chunks: int, threads: int) -> dict:
    from slicegpt import load_model, perplexity
    from slicegpt.io.data import load_texts

    torch.set_num_threads(threads)
    model, tokenizer = load_model(MODEL)
    spread = []
    for name, module in model.named_modules():
        if name.endswith(("post_attention_layernorm", "post_feedforward_layernorm")):
            scale = 1.0 + module.weight.double()
            spread.append((scale.std() / scale.mean().abs()).item())
            module.weight.fill_(scale.mean().item() - 1.0)
    ppl = perplexity(model, tokenizer, load_texts(str(harness.WIKITEXT_TEST)), chunks=ppl_chunks,
                     progress=False)["ppl"]
    return {"config": MEAN_SCALE, "ppl": ppl, "post_norm_scale_cv_min": min(spread),
            "post_norm_scale_cv_max": max(spread)}


def measure(name: str, dense: bool, threads: int, quick: bool, measure_slice=harness.measure_slice_isolated,
            run_isolated=harness.run_isolated) -> dict:
    """One configuration's row, measured in a process of its own (`dense`: the dense model's
    perplexities and forward time too, in the same process, before slicing)."""
    sizes = QUICK if quick else {}
    if name == MEAN_SCALE:
        return run_isolated(mean_scale_run, sizes.get("ppl_chunks", harness.PPL_CHUNKS), threads)
    run = harness.SliceRun(settings=CONFIGS[name], model=MODEL, cal_batch_size=CAL_BATCH_SIZE, dense=dense,
                           baseline=dense, threads=threads, **sizes)
    return {"config": name, "settings": CONFIGS[name], **measure_slice(run)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings, to check the script runs")
    parser.add_argument("--fresh", action="store_true", help="drop the rows already measured")
    parser.add_argument("--threads", type=int, default=harness.THREADS)
    parser.add_argument("--only", help="comma-separated configurations, written to gemma3_<first>.json")
    args = parser.parse_args()

    names = args.only.split(",") if args.only else list(CONFIGS)
    tag = f"_{names[0]}" if args.only else ""
    out = harness.RESULTS / f"gemma3{tag}{'_quick' if args.quick else ''}.json"
    store = harness.RowsDocument(out, lambda row: row["config"], lambda rows: document(rows, args.quick, args.threads),
                                 fresh=args.fresh)
    for name in names:
        if name in store.measured():
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        store.add(measure(name, dense=name == next(iter(CONFIGS)), threads=args.threads, quick=args.quick))
    store.write()
    rows = store.rows()
    print_table(rows, summarise(rows))
    print(f"wrote {harness.shown(out)}")


def document(rows: list[dict], quick: bool, threads: int) -> dict:
    return {"protocol": "P", "model": MODEL, "quick": quick, "threads": threads, "rows": rows,
            "summary": summarise(rows), "torch": torch.__version__}


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
