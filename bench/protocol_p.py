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
import sys

import torch

import harness

ORIGINAL = {  # the original implementation on this protocol (a reference figure, not rerun here)
    "dense_ppl": 20.71, "sliced_ppl": {"0.2": 43.95, "0.25": 52.21, "0.3": 66.18},
    "slice_s_25": 718.0, "dense_forward_s": 342.0, "params_25": 140.65e6, "params_dense": 134.52e6,
}
# A row's fields besides its sparsity and variant (measure_slice's, less the layout it resolved to).
FIELDS = ["params_dense", "refit_damping", "ppl_dense", "ppl_lambada_dense", "dense_forward_s",
          "calibrate_and_slice_s", "ppl_sliced", "ppl_lambada_sliced", "params_sliced", "params_shortcuts",
          "params_head", "peak_rss_gib", "peak_gpu_gib"]
QUICK = {"cal_samples": 4, "cal_seqlen": 256, "ppl_chunks": 1}  # --quick: a smoke run


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


def results_path(tag: str = "", quick: bool = False, device: str = "cpu"):
    """bench/results/protocol_p[_quick][_DEVICE][_TAG].json"""
    suffix = ("_quick" if quick else "") + ("" if device == "cpu" else "_" + device.split(":")[0])
    suffix += f"_{tag}" if tag else ""
    return harness.RESULTS / f"protocol_p{suffix}.json"


def measure(sparsities: list[float], variant: str = "", tag: str = "", threads: int = harness.THREADS,
            device: str = "cpu", quick: bool = False, dense: bool = True, dense_ppl: bool = True,
            refit_damping: float | None = None, measure_slice=harness.measure_slice_isolated) -> harness.RowsDocument:
    """Each sparsity not yet in the results file, sliced and measured in a process of its own; the
    file is written after each. At 0.25 the dense model is measured too (`dense`: its forward time,
    `dense_ppl`: its perplexities)."""
    out = results_path(tag, quick, device)
    store = harness.RowsDocument(out, lambda row: (row["sparsity"], row.get("variant", "")),
                                 lambda rows: document(rows, quick, threads, device))
    corpora = [name for name, path in harness.CORPORA.items() if path.is_file()]
    for sparsity in sparsities:
        if (sparsity, variant) in store.measured():
            print(f"sparsity {sparsity}: already measured in {harness.shown(out)}", file=sys.stderr)
            continue
        run = harness.SliceRun(settings={"sparsity": sparsity, **parse_variant(variant)}, corpora=corpora,
                               dense=sparsity == 0.25 and dense and dense_ppl, baseline=sparsity == 0.25 and dense,
                               refit_damping=refit_damping, device=device, threads=threads,
                               **(QUICK if quick else {}))
        print(f"running sparsity {sparsity} ...", file=sys.stderr, flush=True)
        row = measure_slice(run)
        store.add({"sparsity": sparsity, "variant": variant, **{k: row[k] for k in FIELDS if k in row}})
    return store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings, to check the script runs")
    parser.add_argument("--sparsities", default="0.2,0.25,0.3")
    parser.add_argument("--threads", type=int, default=harness.THREADS)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (results go to protocol_p_cuda.json)")
    parser.add_argument("--variant", default="", help="SliceConfig settings, e.g. refit=true,rotations=block")
    parser.add_argument("--tag", default="", help="results go to protocol_p_TAG.json")
    parser.add_argument("--no-dense", action="store_true",
                        help="measure only the sliced model (no dense perplexity or dense forward time)")
    parser.add_argument("--no-dense-ppl", action="store_true",
                        help="time the dense forward but skip the dense perplexities (known from other runs)")
    parser.add_argument("--refit-damping", type=float, default=None,
                        help="the refit's ridge weight, relative to the mean diagonal (default: the library's)")
    args = parser.parse_args()
    store = measure([float(s) for s in args.sparsities.split(",")], args.variant, args.tag, args.threads,
                    args.device, args.quick, dense=not args.no_dense, dense_ppl=not args.no_dense_ppl,
                    refit_damping=args.refit_damping)
    rows = store.rows()
    print_table(rows, summarise(rows))
    print(f"wrote {harness.shown(store.path)}")


def document(rows: list[dict], quick: bool, threads: int, device: str) -> dict:
    return {"protocol": "P", "quick": quick, "threads": threads, "device": device, "rows": rows,
            "summary": summarise(rows), "original": ORIGINAL, "torch": torch.__version__}


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
