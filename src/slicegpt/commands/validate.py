"""One validation step per subcommand, run by the CLI before the command itself.

Each step checks every option and every output location, and what the model's
config.json says, before any weights are loaded or any token is computed, and returns
the outputs the run writes, which the CLI then holds (io/output_lock.py) for the life of
the run. A check the command makes again later (the command functions stay usable on
their own) costs nothing; a check made only later costs the user the run.
"""

from __future__ import annotations

import os
from pathlib import Path

from slicegpt.commands.common import say
from slicegpt.commands.finetune import TEACHER_TEXT_OPTIONS
from slicegpt.errors import SliceGPTError
from slicegpt.running import teacher_text
from slicegpt.running.finetune import check_settings as check_finetune_settings
from slicegpt.validation.model_config import (attention_heads, check_known_type, check_positions, check_sliceable,
                                              plain_step, plain_width_message, read_config)
from slicegpt.validation.options import (at_least, check_device, check_ppl_options, check_threads, flag, fraction,
                                         positive)
from slicegpt.validation.outputs import check_not_input, check_output_location


def model_options(args) -> None:
    check_threads(args)
    check_device(args.device)


def zeroshot_options(args) -> None:
    at_least(args, "zeroshot_limit", 1)
    at_least(args, "zeroshot_batch_size", 1)


def slice_options(args) -> None:
    """What `slice` and `sweep` share: the method's numbers, perplexity, zero-shot, the model."""
    for name in ("round_to", "cal_samples", "cal_seqlen", "cal_batch_size"):
        at_least(args, name, 1)
    fraction(args, "basis_share", low_open=True, high_open=False)
    fraction(args, "refit_share", low_open=True, high_open=False)
    check_ppl_options(args, "ppl-")
    zeroshot_options(args)
    model_options(args)


def plain_widths(args, config: dict) -> None:
    """--plain: round widths so the plain class accepts them (a multiple of its attention heads too)."""
    if not getattr(args, "plain", False):
        return
    step = plain_step(config, args.round_to)
    if step is not None and step != args.round_to:
        say(f"--plain: widths rounded to a multiple of {step} instead of {args.round_to}, so that a plain "
            f"{(config.get('architectures') or ['model'])[0]} accepts them (--round-to {args.round_to} and its "
            f"{attention_heads(config)} attention heads)")
        args.round_to = step


def main_rank() -> bool:
    """Under torchrun only rank 0 holds the outputs (every rank of one run writes into them)."""
    return int(os.environ.get("RANK", "0")) == 0


def validate_slice(args) -> list[Path]:
    if args.sparsity is not None:
        fraction(args, "sparsity", low_open=False, high_open=True)
    fraction(args, "target_ratio", low_open=True, high_open=False)
    at_least(args, "target_params", 1)
    positive(args, "dist_timeout")
    return _slicing_run(args, ppl_seqlen=args.ppl_seqlen if args.eval_ppl else None)


def _slicing_run(args, ppl_seqlen: int | None) -> list[Path]:
    """What slice and sweep share: the slicing options, the output and the model's config."""
    slice_options(args)
    check_output_location(args.out)
    check_not_input(args.out, args.model)
    config = read_config(args.model)
    if config is not None:
        check_sliceable(args.model, config)
        check_positions(args.model, config, {"--cal-seqlen": args.cal_seqlen, "--ppl-seqlen": ppl_seqlen})
        plain_widths(args, config)
    return [Path(args.out)]


def validate_sweep(args) -> list[Path]:
    from slicegpt.commands.sweep import parse_sparsities

    for value in parse_sparsities(args.sparsities):
        if not 0 <= value < 1:
            raise SliceGPTError(f"--sparsities: each must be in [0, 1), got {value:g}")
    return _slicing_run(args, ppl_seqlen=args.ppl_seqlen)


def validate_ppl(args) -> list[Path]:
    check_ppl_options(args)
    model_options(args)
    config = read_config(args.model)
    if config is not None:
        check_known_type(args.model, config)
        check_positions(args.model, config, {"--seqlen": args.seqlen})
    return []


def validate_eval(args) -> list[Path]:
    at_least(args, "limit", 1)
    at_least(args, "batch_size", 1)
    model_options(args)
    if args.out:
        check_output_location(args.out)
    config = read_config(args.model)
    if config is not None:
        check_known_type(args.model, config)
    return [Path(args.out)] if args.out else []


def validate_finetune(args) -> list[Path]:
    at_least(args, "checkpoint_every", 1)
    check_finetune_settings(args, name=flag)  # the rules FinetuneConfig applies, naming the flags
    teacher_options(args)
    check_ppl_options(args, "ppl-")
    zeroshot_options(args)
    model_options(args)
    check_output_location(args.out)
    check_not_input(args.out, args.model)
    if Path(args.model).is_dir():
        config = read_config(args.model)
        check_positions(args.model, config, {"--seqlen": args.seqlen,
                                             "--ppl-seqlen": args.ppl_seqlen if args.eval_ppl else None})
    return [Path(args.out)]


def teacher_options(args) -> None:
    """The teacher's sampling options, given only with --data teacher, and where its text goes."""
    if args.data != "teacher":
        given = next((name for name in TEACHER_TEXT_OPTIONS if getattr(args, name) is not None), None)
        if given:
            raise SliceGPTError(f"{flag(given)} sets the text the teacher writes, which only --data teacher uses; "
                                "add --data teacher or leave it out")
        if args.teacher and not args.distill:
            raise SliceGPTError("--teacher names the teacher for --distill or --data teacher; add one or leave it out")
    teacher_text.check_settings(args, prefix="teacher_", name=flag)
    if args.teacher_text is not None:
        check_output_location(args.teacher_text, "--teacher-text", kind="file")
        teacher_text.check_text_file(args.teacher_text)


def validate_export(args) -> list[Path]:
    at_least(args, "threads", 1)
    check_output_location(args.out, kind="directory" if args.format == "plain" else "file")
    check_not_input(args.out, args.model)
    config = read_config(args.model)
    if config is not None and args.format == "plain":
        slicing = config.get("slicing")
        if slicing is None:
            raise SliceGPTError(f"{args.model} is not a sliced checkpoint; it is a plain model already")
        round_to = (slicing.get("config") or {}).get("round_to") or 8
        problem = plain_width_message(config, slicing["embedding_width"], round_to)
        if problem:
            raise SliceGPTError(f"cannot export {args.model} as a plain model: {problem}")
    return [Path(args.out)]


def validate_bench(args) -> list[Path]:
    at_least(args, "warmup", 0)
    model_options(args)
    if args.out:
        check_output_location(args.out, kind="file")
    for name in [args.model] + ([args.compare] if args.compare else []):
        config = read_config(name)
        if config is not None:
            check_known_type(name, config)
            if args.prompt_len >= 1 and args.new_tokens >= 1:
                check_positions(name, config, {"--prompt-len plus --new-tokens": args.prompt_len + args.new_tokens})
    return [Path(args.out)] if args.out else []


VALIDATORS = {"slice": validate_slice, "sweep": validate_sweep, "ppl": validate_ppl, "eval": validate_eval,
              "finetune": validate_finetune, "export": validate_export, "bench": validate_bench}


def validate(args) -> list[Path]:
    """Check the parsed command line; return the outputs this process holds while the run writes them."""
    outputs = VALIDATORS[args.command](args)
    return outputs if main_rank() else []
