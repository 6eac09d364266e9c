"""Options and helpers shared by several subcommands."""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager

from ..models import DTYPES


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


def apply_threads(args) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


@contextmanager
def timed(timings: dict, name: str):
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 3)


def print_json(data: dict) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


def say(message: str) -> None:
    """Progress for people goes to stderr, so stdout stays parseable."""
    print(message, file=sys.stderr, flush=True)
