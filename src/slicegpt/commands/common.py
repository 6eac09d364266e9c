"""Options and helpers shared by several subcommands."""

from __future__ import annotations

import argparse
import json
import sys

from slicegpt.errors import SliceGPTError
from slicegpt.io.models import DTYPES
from slicegpt.jobs.progress import say, timed  # noqa: F401 (the commands' progress, shared with the jobs)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights' dtype (default float32)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def add_ppl_options(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    parser.add_argument(f"--{prefix}data", default="wikitext2", metavar="PATH_OR_HUB_NAME",
                        help="perplexity text: a .jsonl/.txt file or a hub dataset (default: WikiText-2 raw, test)")
    parser.add_argument(f"--{prefix}chunks", type=int, default=None, metavar="K",
                        help="use only the first K chunks (default: all)")
    parser.add_argument(f"--{prefix}seqlen", type=int, default=2048, metavar="L", help="chunk length (default 2048)")
    parser.add_argument(f"--{prefix}batch-size", type=int, default=1, metavar="B", help="chunks per forward (default 1)")


def add_zeroshot_options(parser: argparse.ArgumentParser, flag: str = "--eval-zeroshot") -> None:
    parser.add_argument(flag, dest="eval_zeroshot", default=None, metavar="TASKS",
                        help="comma-separated lm-eval tasks, e.g. piqa,arc_easy,arc_challenge,hellaswag,winogrande,"
                             "lambada_openai")
    parser.add_argument("--zeroshot-limit", type=int, default=None, metavar="N",
                        help="evaluate only the first N examples of each task (default: all)")
    parser.add_argument("--zeroshot-batch-size", type=int, default=8, metavar="B",
                        help="lm-eval batch size (default 8)")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="local copies of the task data (default: $SLICEGPT_DATA_DIR, else ../shared/data "
                             "next to a source checkout, else the hub)")


def zeroshot_tasks(args) -> list[str] | None:
    """The requested tasks, checked before any slow work; None when none were asked for."""
    if not getattr(args, "eval_zeroshot", None):
        return None
    from slicegpt.evaluation.zeroshot import check_task_data, parse_tasks

    if args.zeroshot_limit is not None and args.zeroshot_limit < 1:
        raise SliceGPTError(f"--zeroshot-limit must be at least 1, got {args.zeroshot_limit}")
    tasks = parse_tasks(args.eval_zeroshot)
    check_task_data(tasks, args.data_dir)  # a missing data file fails now, not after slicing
    return tasks


def run_zeroshot(model, tokenizer, tasks: list[str], args) -> dict:
    from slicegpt.evaluation.zeroshot import evaluate_zeroshot

    return evaluate_zeroshot(model, tokenizer, tasks, limit=args.zeroshot_limit, batch_size=args.zeroshot_batch_size,
                             data_dir=args.data_dir)


def apply_threads(args) -> None:
    if getattr(args, "threads", None) is not None:
        import torch

        torch.set_num_threads(args.threads)


def print_json(data: dict) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")
