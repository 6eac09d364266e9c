"""Layouts at equal real size: which basis layout to use where `--rotations auto` chooses.

For each sparsity, the real size of the per-block layout at that sparsity (what `--sparsity`
means) is spent on each layout in turn: a basis per block with and without the refit, one
basis for the whole model with the refit, and groups of 10 layers with the refit. Each
configuration is one protocol P run in a process of its own (bench/protocol_p.py's: 64 x 2048
calibration tokens of WikiText-2 validation, 16 chunks of WikiText-2 test and of the LAMBADA
passages), so the figures compare with the rest of protocol P.

    python bench/layouts.py                          # 0.25, 0.30 and 0.35, every layout
    python bench/layouts.py --sparsities 0.30 --layouts model-refit
Writes bench/results/protocol_p_layouts.json (resumable: a rerun skips what is there).
"""

from __future__ import annotations

import argparse
import json
import sys

import harness
import protocol_p

TAG = "layouts"  # results: protocol_p_layouts.json
DENSE = {"ppl": 20.71, "lambada": 36.36}  # protocol P's dense figures (protocol_p_default_refit.json)
LAYOUTS = {  # name: SliceConfig settings; shared layouts get the per-block size as a budget
    "block": "rotations=block,refit=false",
    "block-refit": "rotations=block,refit=true",
    "model-refit": "rotations=model,refit=true",
    "model-refit-all": "rotations=model,refit=true,refit_share=1.0",
    "group10-refit": "rotations=group:10,refit=true",
}


def per_block_sizes(sparsities: list[float]) -> dict[float, int]:
    """The real parameter count of the per-block layout at each sparsity."""
    from slicegpt import SliceConfig, load_model
    from slicegpt.architectures.families import family_for
    from slicegpt.sizing.budget import uniform_size

    model, _ = load_model(harness.MODEL)
    family = family_for(model)
    return {s: uniform_size(model, family, SliceConfig(sparsity=s, rotations="block")) for s in sparsities}


def variant(layout: str, size: int) -> str:
    settings = LAYOUTS[layout]
    return settings if layout.startswith("block") else f"{settings},target_params={size}"


def measure(sparsities: list[float], layouts: list[str], sizes: dict[float, int], threads: int,
            measure_slice=harness.measure_slice_isolated) -> None:
    """Every layout at every sparsity not yet in the results file, the sliced model only."""
    for sparsity in sparsities:
        for layout in layouts:
            print(f"{layout} at {sparsity}", file=sys.stderr, flush=True)
            protocol_p.measure([sparsity], variant(layout, sizes[sparsity]), TAG, threads, dense=False,
                               measure_slice=measure_slice)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", default="0.3,0.35,0.25")
    parser.add_argument("--layouts", default="model-refit,block,block-refit,group10-refit")
    parser.add_argument("--threads", type=int, default=harness.THREADS)
    parser.add_argument("--table", action="store_true", help="print the results as a markdown table and stop")
    args = parser.parse_args()
    if args.table:
        print(markdown_table())
        return
    sparsities = [float(s) for s in args.sparsities.split(",")]
    measure(sparsities, args.layouts.split(","), per_block_sizes(sparsities), args.threads)
    print_table()


def recorded_rows() -> list[dict]:
    return json.loads(protocol_p.results_path(TAG).read_text())["rows"]


def layout_of(row: dict) -> str:
    given = set(row["variant"].split(","))
    return next(name for name, settings in LAYOUTS.items()
                if set(settings.split(",")) == {item for item in given if not item.startswith("target_params")})


NAMES = {"block": "a basis per block", "block-refit": "a basis per block, refit (all)",
         "model-refit": "one basis, refit", "model-refit-all": "one basis, refit (all)",
         "group10-refit": "groups of 10 layers, refit"}


def markdown_table() -> str:
    rows = sorted(recorded_rows(), key=lambda r: (r["sparsity"], -r["ppl_lambada_sliced"]))
    lines = ["| sparsity | layout | real parameters (× dense) | WikiText-2 (× dense) | LAMBADA passages (× dense) |",
             "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['sparsity']:.2f} | {NAMES[layout_of(row)]} | {row['params_sliced']:,} "
                     f"({row['params_sliced'] / row['params_dense']:.3f}) | {row['ppl_sliced']:.2f} "
                     f"({row['ppl_sliced'] / DENSE['ppl']:.2f}) | {row['ppl_lambada_sliced']:.2f} "
                     f"({row['ppl_lambada_sliced'] / DENSE['lambada']:.2f}) |")
    return "\n".join(lines)


def print_table() -> None:
    rows = recorded_rows()
    print(f"{'sparsity':>8} {'layout':>14} {'params':>12} {'x dense':>7} {'WikiText-2':>10} {'x dense':>7} "
          f"{'LAMBADA':>8} {'x dense':>7} {'slice s':>8}")
    for row in sorted(rows, key=lambda r: (r["sparsity"], r["params_sliced"])):
        print(f"{row['sparsity']:>8.2f} {layout_of(row):>14} {row['params_sliced']:>12,} "
              f"{row['params_sliced'] / row['params_dense']:>7.3f} {row['ppl_sliced']:>10.2f} "
              f"{row['ppl_sliced'] / DENSE['ppl']:>7.2f} {row['ppl_lambada_sliced']:>8.2f} "
              f"{row['ppl_lambada_sliced'] / DENSE['lambada']:>7.2f} {row['calibrate_and_slice_s']:>8.1f}")


if __name__ == "__main__":
    main()
