"""Real parameters against perplexity for every slicing variant (the "smaller than dense" goal).

Protocol P by default: smollm2-135m, 2 threads, seed 42, calibration 64 x 2048 tokens of
WikiText-2 (v1) validation, perplexity on the first 16 chunks of WikiText-2 raw test.
Each variant slices a fresh copy of the model. Prints a table, writes
bench/results/size_quality.json and a plot of parameters against perplexity, with the
original code's point (140.65M, 52.21) beside ours.

    python bench/size_quality.py                         # all variants, protocol P
    python bench/size_quality.py --variants default,untied --cal-samples 16 --ppl-chunks 4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import harness

ORIGINAL = {"label": "original code, 25%", "params": 140.65e6, "ppl": 52.21}
DENSE_PARAMS = 134_515_008
BUDGET = 0.85  # the size target: at most 0.85 x dense

# key -> (label, SliceConfig settings). "25%" variants use sparsity 0.25; the others the size target.
VARIANTS = {
    "untied": ("untied head, 25% (as the original)", dict(sparsity=0.25, tied_head=False)),
    "default": ("default, 25%", dict(sparsity=0.25)),
    "tied-input": ("tied head, embedding-only basis, 25%", dict(sparsity=0.25, tied_head_basis="input")),
    "variance": ("variance widths, 25%", dict(sparsity=0.25, widths="variance")),
    "normalized": ("normalized PCA, 25%", dict(sparsity=0.25, pca="normalized")),
    "variance-normalized": ("variance widths + normalized PCA, 25%",
                            dict(sparsity=0.25, widths="variance", pca="normalized")),
    "block": ("two rotations per layer, 0.85x", dict(target_ratio=BUDGET)),
    "layer": ("one rotation per layer, 0.85x", dict(target_ratio=BUDGET, rotations="layer")),
    "layer-variance": ("one per layer + variance widths, 0.85x",
                       dict(target_ratio=BUDGET, rotations="layer", widths="variance")),
    "group5": ("groups of 5 layers, 0.85x", dict(target_ratio=BUDGET, rotations="group:5")),
    "model": ("one rotation (no shortcuts), 0.85x", dict(target_ratio=BUDGET, rotations="model", pca="raw")),
    "model25": ("one rotation (no shortcuts), 25%", dict(sparsity=0.25, rotations="model", pca="raw")),
    # The real size of the two-rotation layout at 25% (112,243,968), spent on one rotation.
    "model-b25": ("one rotation, at the size of 25% block", dict(target_params=112_243_968, rotations="model",
                                                                 pca="raw")),
    "model-normalized": ("one rotation, normalized PCA, 0.85x", dict(target_ratio=BUDGET, rotations="model",
                                                                       pca="normalized")),
    "model-b25-normalized": ("one rotation, 25% block's size, normalized PCA",
                             dict(target_params=112_243_968, rotations="model", pca="normalized")),
    "default25": ("default, 25% (auto: one rotation, normalized PCA)", dict(sparsity=0.25)),
    "default25-refit": ("default + least-squares refit, 25%", dict(sparsity=0.25, refit=True)),
    "model-refit": ("one rotation + least-squares refit, 0.85x", dict(target_ratio=BUDGET, rotations="model",
                                                                       refit=True, pca="raw")),
    "block25-refit": ("two rotations per layer + least-squares refit, 25%", dict(sparsity=0.25, rotations="block",
                                                                             refit=True)),
    "model25-refit": ("one rotation + least-squares refit, 25%",
                      dict(sparsity=0.25, rotations="model", refit=True, pca="raw")),
}


def run_variant(key: str, args) -> dict:
    """One variant sliced from a fresh copy of the model and measured, in this process."""
    label, settings = VARIANTS[key]
    measured = harness.measure_slice(harness.SliceRun(settings=settings, cal_samples=args.cal_samples,
                                                      cal_seqlen=args.cal_seqlen, ppl_chunks=args.ppl_chunks,
                                                      corpora=["wikitext2"], threads=args.threads))
    return {"key": key, "label": label, "settings": settings, "width": measured["width"],
            "params": measured["params_sliced"], "shortcuts": measured["params_shortcuts"],
            "head": measured["params_head"], "ppl": measured["ppl_sliced"],
            "slice_s": round(measured["calibrate_and_slice_s"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated keys from {list(VARIANTS)}")
    parser.add_argument("--cal-samples", type=int, default=harness.CAL_SAMPLES)
    parser.add_argument("--cal-seqlen", type=int, default=harness.CAL_SEQLEN)
    parser.add_argument("--ppl-chunks", type=int, default=harness.PPL_CHUNKS)
    parser.add_argument("--threads", type=int, default=harness.THREADS)
    parser.add_argument("--dense", action="store_true", help="also measure the dense model's perplexity")
    parser.add_argument("--out", default=str(harness.RESULTS / "size_quality.json"))
    args = parser.parse_args()
    keys = [key.strip() for key in args.variants.split(",")]
    unknown = [key for key in keys if key not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    torch.set_num_threads(args.threads)

    rows = []
    if args.dense:
        from slicegpt import load_model, perplexity
        from slicegpt.io.data import load_texts

        model, tokenizer = load_model(harness.MODEL)
        ppl = perplexity(model, tokenizer, load_texts(str(harness.WIKITEXT_TEST)), chunks=args.ppl_chunks,
                         progress=False)["ppl"]
        rows.append({"label": "dense", "params": DENSE_PARAMS, "shortcuts": 0, "head": 0, "width": 576, "ppl": ppl})
        del model
    for key in keys:
        print(f"running {key} ...", file=sys.stderr, flush=True)
        rows.append(run_variant(key, args))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    print(f"{'variant':<38} {'width':>5} {'params':>13} {'x dense':>7} {'shortcuts':>10} {'head':>10} {'ppl':>8}")
    for row in rows:
        print(f"{row['label']:<38} {row['width']:>5} {row['params']:>13,} {row['params'] / DENSE_PARAMS:>7.3f} "
              f"{row['shortcuts']:>10,} {row['head']:>10,} {row['ppl']:>8.2f}")
    print(f"{ORIGINAL['label']:<38} {'':>5} {int(ORIGINAL['params']):>13,} "
          f"{ORIGINAL['params'] / DENSE_PARAMS:>7.3f} {'':>10} {'':>10} {ORIGINAL['ppl']:>8.2f}")
    out = Path(args.out)
    protocol = {"cal_samples": args.cal_samples, "cal_seqlen": args.cal_seqlen, "ppl_chunks": args.ppl_chunks,
                "threads": args.threads, "seed": harness.SEED}
    harness.write_json(out, {"protocol": protocol, "rows": rows, "original": ORIGINAL})
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        ax.scatter(row["params"] / 1e6, row["ppl"], label=row["label"])
    ax.scatter(ORIGINAL["params"] / 1e6, ORIGINAL["ppl"], marker="x", color="black", label=ORIGINAL["label"])
    ax.axvline(BUDGET * DENSE_PARAMS / 1e6, color="grey", linestyle=":", label="0.85 x dense")
    ax.set_xlabel("real parameters (millions)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_title("SmolLM2-135M: size against quality")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
