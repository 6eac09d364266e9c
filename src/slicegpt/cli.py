"""The `slicegpt` command line."""

from __future__ import annotations

import argparse
import sys

from slicegpt.commands import bench, eval as eval_command, export, finetune, ppl, slice as slice_command, sweep
from slicegpt.commands.validate import validate
from slicegpt.errors import SliceGPTError
from slicegpt.io.output_lock import output_locks
from slicegpt.io.write_failure import no_space_message

COMMANDS = [slice_command, sweep, ppl, eval_command, finetune, export, bench]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slicegpt", description="Compress causal language models with SliceGPT.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        outputs = validate(args)  # every option, output and config checked before any work
        with output_locks(outputs):  # one run per output at a time
            return args.run(args)
    except SliceGPTError as error:
        print(f"slicegpt: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # a full disk is the one failure in the work itself said in one line
        message = no_space_message(error)
        if message is None:
            raise
        print(f"slicegpt: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slicegpt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
