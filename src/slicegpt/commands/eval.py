"""slicegpt eval zeroshot MODEL_OR_DIR --tasks ...: zero-shot accuracy through lm-evaluation-harness."""

from __future__ import annotations

import json
from pathlib import Path

from slicegpt.io.checkpoint import atomic_directory, check_output_dir
from slicegpt.evaluation.zeroshot import check_task_data, evaluate_zeroshot, format_table, parse_tasks
from slicegpt.errors import SliceGPTError
from slicegpt.io.models import load_model
from slicegpt.evaluation.plots import png_bytes, zeroshot_figure
from slicegpt.sizing.counts import count_parameters
from slicegpt.io.report import versions
from slicegpt.commands.common import add_model_options, apply_threads, print_json, timed

DEFAULT_TASKS = "piqa,arc_easy,arc_challenge,hellaswag,winogrande,lambada_openai"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a dense or sliced model")
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="KIND")
    zeroshot = kinds.add_parser("zeroshot", help="zero-shot tasks through lm-evaluation-harness")
    zeroshot.add_argument("model", metavar="MODEL_OR_DIR", help="smollm2-135m, gemma3-270m, a model directory, a .gguf file or a hub id")
    zeroshot.add_argument("--tasks", default=DEFAULT_TASKS, help=f"comma-separated tasks (default {DEFAULT_TASKS})")
    zeroshot.add_argument("--limit", type=int, default=None, metavar="N",
                          help="evaluate only the first N examples of each task (default: all)")
    zeroshot.add_argument("--batch-size", type=int, default=8, metavar="B", help="lm-eval batch size (default 8)")
    zeroshot.add_argument("--data-dir", default=None, metavar="DIR",
                          help="local copies of the task data (default: $SLICEGPT_DATA_DIR, else ../shared/data next "
                               "to a source checkout, else the hub)")
    zeroshot.add_argument("--out", default=None, metavar="DIR",
                          help="write zeroshot.json and zeroshot.png here (default: print only)")
    zeroshot.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    zeroshot.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    add_model_options(zeroshot)
    zeroshot.set_defaults(run=run_zeroshot)


def run_zeroshot(args) -> int:
    apply_threads(args)
    tasks = parse_tasks(args.tasks)
    if args.limit is not None and args.limit < 1:
        raise SliceGPTError(f"--limit must be at least 1, got {args.limit}")
    check_task_data(tasks, args.data_dir)
    out = Path(args.out) if args.out is not None else None
    if out is not None:
        check_output_dir(out, args.overwrite)
    timings: dict[str, float] = {}
    with timed(timings, "load"):
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    with timed(timings, "zeroshot"):
        result = evaluate_zeroshot(model, tokenizer, tasks, limit=args.limit, batch_size=args.batch_size,
                                   data_dir=args.data_dir)
    report = {"model": args.model, "params": count_parameters(model), **result, "timings_s": timings,
              "versions": versions()}
    if out is not None:
        def write(directory: Path) -> None:
            (directory / "zeroshot.json").write_text(json.dumps(report, indent=2) + "\n")
            (directory / "zeroshot.png").write_bytes(png_bytes(zeroshot_figure({args.model: result})))

        atomic_directory(out, args.overwrite, write)
    if args.json:
        print_json(report)
    else:
        print(f"{args.model}: zero-shot accuracy (%), {report['params']:,} parameters")
        print(format_table({Path(args.model).name or args.model: result}))
    return 0
