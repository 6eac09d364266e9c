"""slicegpt sweep MODEL --sparsities 0.1,0.2,0.3 --out DIR: perplexity against slicing.

One sliced checkpoint per sparsity under DIR (DIR/sparsity-0.10, ...), plus sweep.json and
ppl_vs_sparsity.png (and zeroshot.png when zero-shot tasks are asked for). The dense model
is measured once.
"""

from __future__ import annotations

import json
from pathlib import Path

from slicegpt.io.checkpoint import check_output_dir
from slicegpt.io.data import load_texts
from slicegpt.errors import SliceGPTError
from slicegpt.evaluation.plots import png_bytes, ppl_figure, zeroshot_figure
from slicegpt.io.report import versions
from slicegpt.commands.common import apply_threads, say, zeroshot_tasks
from slicegpt.commands.slice import slice_and_save
from slicegpt.commands.slice_options import add_slice_options, check_plain, slice_config


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("sweep", help="slice at several sparsities; plot perplexity against slicing")
    parser.add_argument("model", metavar="MODEL", help="smollm2-135m, gemma3-270m, a model directory, a .gguf file or a hub id")
    parser.add_argument("--sparsities", required=True, metavar="S1,S2,...",
                        help="comma-separated fractions of the residual width to remove, e.g. 0.1,0.2,0.3")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (one checkpoint per sparsity)")
    add_slice_options(parser)
    parser.set_defaults(run=run)


def parse_sparsities(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SliceGPTError(f"--sparsities takes comma-separated numbers, got {text!r}") from None
    if not values:
        raise SliceGPTError("--sparsities is empty")
    return sorted(set(values))


def run(args) -> int:
    apply_threads(args)
    sparsities = parse_sparsities(args.sparsities)
    configs = [slice_config(args, s) for s in sparsities]  # validates every sparsity up front
    out = Path(args.out)
    check_output_dir(out, args.overwrite)
    check_plain(args, configs[0])
    tasks = zeroshot_tasks(args)
    cal_texts = load_texts(args.cal_data, split="train")
    ppl_texts = load_texts(args.ppl_data, split="test")

    dense: dict = {}
    rows = []
    for config in configs:
        target = out / f"sparsity-{config.sparsity:.2f}"
        say(f"slicing at {config.sparsity:.0%} -> {target}")
        report = slice_and_save(args, config, target, cal_texts, ppl_texts, tasks, dense=dense)
        row = {"sparsity": config.sparsity, "dir": target.name, "ppl": report["ppl"]["sliced"],
               "params": report["params"]["sliced"], "params_ratio": report["params"]["sliced"] / report["params"]["dense"]}
        if tasks:
            row["zeroshot_average"] = report["zeroshot"]["sliced"]["average"]
            row["zeroshot"] = report["zeroshot"]["sliced"]
        rows.append(row)
        dense_params = report["params"]["dense"]

    summary = {
        "model": args.model,
        "dense": {"ppl": dense["ppl"], "params": dense_params,
                  **({"zeroshot_average": dense["zeroshot"]["average"], "zeroshot": dense["zeroshot"]} if tasks else {})},
        "sliced": rows,
        "config": {k: v for k, v in configs[0].to_dict().items() if k != "sparsity"} |
                  {"ppl_data": args.ppl_data, "ppl_seqlen": args.ppl_seqlen, "ppl_chunks": args.ppl_chunks,
                   "eval_zeroshot": tasks, "zeroshot_limit": args.zeroshot_limit},
        "versions": versions(),
    }
    (out / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "ppl_vs_sparsity.png").write_bytes(png_bytes(ppl_figure(rows, dense["ppl"])))
    if tasks:
        columns = {"dense": dense["zeroshot"], **{f"{r['sparsity']:.0%}": r["zeroshot"] for r in rows}}
        (out / "zeroshot.png").write_bytes(png_bytes(zeroshot_figure(columns)))
    print_table(summary)
    return 0


def print_table(summary: dict) -> None:
    has_zeroshot = "zeroshot_average" in summary["dense"]
    header = f"{'sparsity':>9} {'params':>14} {'ratio':>7} {'ppl':>10}" + (f" {'0-shot avg':>11}" if has_zeroshot else "")
    print(header)
    dense = summary["dense"]
    line = f"{'dense':>9} {dense['params']:>14,} {1.0:>7.3f} {dense['ppl']:>10.3f}"
    print(line + (f" {100 * dense['zeroshot_average']:>11.2f}" if has_zeroshot else ""))
    for row in summary["sliced"]:
        line = f"{row['sparsity']:>9.0%} {row['params']:>14,} {row['params_ratio']:>7.3f} {row['ppl']:>10.3f}"
        print(line + (f" {100 * row['zeroshot_average']:>11.2f}" if has_zeroshot else ""))
