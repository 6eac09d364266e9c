"""slicegpt sweep MODEL --sparsities 0.1,0.2,0.3 --out DIR: perplexity against slicing.

One sliced checkpoint per sparsity under DIR (DIR/sparsity-0.10, ...), plus sweep.json and
ppl_vs_sparsity.png (and zeroshot.png when zero-shot tasks are asked for). The dense model
is measured once.

Every sparsity is checked before the first is sliced (its width, its layout under --plain,
the disk all of them take), on the model's module tree without its weights. sweep.json is
written when the sweep starts and again as each sparsity is saved, holding the settings and
the finished rows, so a sweep that stops (killed, interrupted, a full disk) resumes when the
same command runs again: the finished sparsities are kept, and the dense measurements with
them. `--overwrite` starts over.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from slicegpt.io.checkpoint import atomic_file, check_output_dir
from slicegpt.io.data import load_texts
from slicegpt.errors import SliceGPTError
from slicegpt.evaluation.plots import png_bytes, ppl_figure, zeroshot_figure
from slicegpt.io.report import versions
from slicegpt.commands.common import apply_threads, say, zeroshot_tasks
from slicegpt.commands.slice import check_plain_layout, output_size_bound, slice_and_save
from slicegpt.commands.slice_options import add_slice_options, check_plain, slice_config

SUMMARY_FILE = "sweep.json"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("sweep", help="slice at several sparsities; plot perplexity against slicing")
    parser.add_argument("model", metavar="MODEL", help="smollm2-135m, gemma3-270m, a model directory, a .gguf file or a hub id")
    parser.add_argument("--sparsities", required=True, metavar="S1,S2,...",
                        help="comma-separated fractions of the residual width to remove, e.g. 0.1,0.2,0.3")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output directory (one checkpoint per sparsity); the same command resumes a sweep "
                             "that stopped")
    add_slice_options(parser)
    parser.set_defaults(run=run)


def directory_name(sparsity: float) -> str:
    return f"sparsity-{sparsity:.2f}"


def parse_sparsities(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SliceGPTError(f"--sparsities takes comma-separated numbers, got {text!r}") from None
    if not values:
        raise SliceGPTError("--sparsities is empty")
    values = sorted(set(values))
    for low, high in zip(values, values[1:]):
        if directory_name(low) == directory_name(high):
            raise SliceGPTError(f"--sparsities {low:g} and {high:g} would both be saved as {directory_name(low)}; "
                                "give sparsities at least 0.01 apart")
    return values


def sweep_settings(args, configs, tasks) -> dict:
    """What makes two sweeps the same sweep (all but the sparsities), as sweep.json records it."""
    config = {k: v for k, v in configs[0].to_dict().items() if k != "sparsity"} | {
        "ppl_data": args.ppl_data, "ppl_seqlen": args.ppl_seqlen, "ppl_chunks": args.ppl_chunks,
        "eval_zeroshot": tasks, "zeroshot_limit": args.zeroshot_limit}
    return json.loads(json.dumps({"model": args.model, "config": config}))


def finished_sweep(out: Path, settings: dict, overwrite: bool) -> dict:
    """The summary of the sweep already in `out` with these settings (empty when there is none or
    --overwrite starts over); refuses an output that holds anything else."""
    path = out / SUMMARY_FILE
    if overwrite or not path.is_file():
        check_output_dir(out, overwrite)
        return {}
    try:
        summary = json.loads(path.read_text())
        saved = {"model": summary["model"], "config": summary["config"]}
    except (OSError, ValueError, KeyError, TypeError):
        raise SliceGPTError(f"{path} is not a sweep summary slicegpt can read; use --overwrite to replace the sweep "
                            f"in {out}, or choose another --out") from None
    if saved != settings:
        changed = sorted(k for k in {*saved["config"], *settings["config"]}
                         if saved["config"].get(k) != settings["config"].get(k))
        changed = (["model"] if saved["model"] != settings["model"] else []) + changed
        raise SliceGPTError(f"{out} holds a sweep with other settings ({', '.join(changed)}); run it with the same "
                            "settings to resume it, use --overwrite to start over, or choose another --out")
    return summary


def check_every_sparsity(args, configs, out: Path) -> None:
    """Each sparsity's layout and width, and the disk they take together, on the model's module tree
    (no weights are read); where the tree cannot be built here, loading will say why."""
    from slicegpt.architectures.families import family_for
    from slicegpt.io.models import DTYPES, resolve
    from slicegpt.running.resources import check_disk
    from slicegpt.running.streaming import empty_model
    from slicegpt.sizing.layout import resolve_layout

    try:
        model = empty_model(resolve(args.model), DTYPES[args.dtype])
    except (OSError, ValueError):
        return
    family = family_for(model)
    total = 0
    for config in configs:
        try:
            resolved = resolve_layout(model, family, config)
            check_plain_layout(args, resolved)
            total += output_size_bound(model, resolved)
        except SliceGPTError as error:
            raise SliceGPTError(f"--sparsities {config.sparsity:g}: {error}") from None
    check_disk(out, {"output": total})


def run(args) -> int:
    apply_threads(args)
    sparsities = parse_sparsities(args.sparsities)
    configs = [slice_config(args, s) for s in sparsities]
    out = Path(args.out)
    check_plain(args, configs[0])
    tasks = zeroshot_tasks(args)
    settings = sweep_settings(args, configs, tasks)
    summary = finished_sweep(out, settings, args.overwrite)
    rows = {row["sparsity"]: row for row in summary.get("sliced", []) if (out / row["dir"]).is_dir()}
    pending = [config for config in configs if config.sparsity not in rows]
    if rows:
        say(f"resuming the sweep in {out}: " + ", ".join(f"{s:g}" for s in sorted(rows)) + " done" +
            (f"; slicing {', '.join(f'{c.sparsity:g}' for c in pending)}" if pending else ""))
    check_every_sparsity(args, pending, out)
    cal_texts = load_texts(args.cal_data, split="train") if pending else []
    ppl_texts = load_texts(args.ppl_data, split="test") if pending else []

    dense = {key: summary["dense"][key] for key in ("ppl", "zeroshot") if key in summary.get("dense", {})}
    dense_params = summary.get("dense", {}).get("params")
    # A sparsity's folder not among the finished rows is a stale or unrecorded one in this sweep's
    # output (the sweep was stopped after saving it, or --overwrite started over): it is replaced.
    replacing = copy.copy(args)
    replacing.overwrite = True
    write_summary(out, args, settings, dense, dense_params, rows, tasks, complete=False)
    for config in pending:
        target = out / directory_name(config.sparsity)
        say(f"slicing at {config.sparsity:.0%} -> {target}")
        report = slice_and_save(replacing, config, target, cal_texts, ppl_texts, tasks, dense=dense)
        row = {"sparsity": config.sparsity, "dir": target.name, "ppl": report["ppl"]["sliced"],
               "params": report["params"]["sliced"], "params_ratio": report["params"]["sliced"] / report["params"]["dense"]}
        if tasks:
            row["zeroshot_average"] = report["zeroshot"]["sliced"]["average"]
            row["zeroshot"] = report["zeroshot"]["sliced"]
        rows[config.sparsity] = row
        dense_params = report["params"]["dense"]
        write_summary(out, args, settings, dense, dense_params, rows, tasks, complete=False)

    summary = write_summary(out, args, settings, dense, dense_params, rows, tasks, complete=True)
    ordered = summary["sliced"]
    atomic_file(out / "ppl_vs_sparsity.png", png_bytes(ppl_figure(ordered, dense["ppl"])))
    if tasks:
        columns = {"dense": dense["zeroshot"], **{f"{r['sparsity']:.0%}": r["zeroshot"] for r in ordered}}
        atomic_file(out / "zeroshot.png", png_bytes(zeroshot_figure(columns)))
    print_table(summary)
    return 0


def write_summary(out: Path, args, settings: dict, dense: dict, dense_params: int | None, rows: dict,
                  tasks: list[str] | None, complete: bool) -> dict:
    """sweep.json: the settings, the dense model's figures once measured, and the finished rows."""
    dense_row = {}
    if "ppl" in dense:
        dense_row = {"ppl": dense["ppl"], "params": dense_params,
                     **({"zeroshot_average": dense["zeroshot"]["average"], "zeroshot": dense["zeroshot"]}
                        if tasks else {})}
    summary = {"model": settings["model"], "complete": complete, "dense": dense_row,
               "sliced": [rows[s] for s in sorted(rows)], "config": settings["config"], "versions": versions()}
    atomic_file(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return summary


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
