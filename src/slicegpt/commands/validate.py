"""One validation step per subcommand, run by the CLI before the command itself.

Each step checks every option and every output location, and what the model's
config.json says, before any weights are loaded or any token is computed, and returns
the outputs the run writes, which the CLI then holds (io/output_lock.py) for the life of
the run. A check the command makes again later (the command functions stay usable on
their own) costs nothing; a check made only later costs the user the run.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from slicegpt.commands.common import say
from slicegpt.commands.finetune import TEACHER_TEXT_OPTIONS
from slicegpt.errors import SliceGPTError
from slicegpt.recovery import teacher_text
from slicegpt.recovery.finetune import check_settings as check_finetune_settings
from slicegpt.validation.model_config import (attention_heads, check_known_type, check_positions, check_sliceable,
                                              check_weight_shapes, plain_step, plain_width_message, read_config)
from slicegpt.validation.options import (at_least, check_device, check_fraction, check_ppl_options,
                                         check_slice_values, check_threads, check_zeroshot_values, flag, fraction,
                                         positive, seed_range)
from slicegpt.validation.outputs import check_name_length, check_not_input, check_output_location, check_writes


def model_options(args) -> None:
    check_threads(args)
    check_device(args.device)


def zeroshot_options(args) -> None:
    check_zeroshot_values(getattr(args, "zeroshot_limit", None), getattr(args, "zeroshot_batch_size", None),
                          ("--zeroshot-limit", "--zeroshot-batch-size"))


def slice_options(args) -> None:
    """What `slice` and `sweep` share: the method's numbers (SliceConfig's rules, by flag), perplexity,
    zero-shot, the model."""
    check_slice_values(lambda field: getattr(args, field, None), flag)
    seed_range(args)
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


def holds_outputs(command: str) -> bool:
    """Whether this process takes the lock on the outputs. Only `slice` coordinates the processes
    torchrun starts (rank 0 holds the outputs that every rank of the run writes into); any other
    command run in several processes has each write on its own, so each must hold the lock.
    RANK alone says nothing: with WORLD_SIZE unset or 1 the process is the only writer."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return command != "slice" or world <= 1 or int(os.environ.get("RANK", "0") or 0) == 0


def validate_slice(args) -> list[Path]:
    positive(args, "dist_timeout")
    return _slicing_run(args, ppl_seqlen=args.ppl_seqlen if args.eval_ppl else None)


def _slicing_run(args, ppl_seqlen: int | None) -> list[Path]:
    """What slice and sweep share: the slicing options, the output and the model's config."""
    slice_options(args)
    check_output_location(args.out)
    check_name_length(args.out)
    check_not_input(args.out, args.model)
    config = read_config(args.model)
    if config is not None:
        check_sliceable(args.model, config)
        check_weight_shapes(args.model, config)
        check_positions(args.model, config, {"--cal-seqlen": args.cal_seqlen, "--ppl-seqlen": ppl_seqlen})
        plain_widths(args, config)
    return [Path(args.out)]


def validate_sweep(args) -> list[Path]:
    from slicegpt.commands.sweep import parse_sparsities

    for value in parse_sparsities(args.sparsities):
        check_fraction(value, "--sparsities: each", low_open=False, high_open=True)
    return _slicing_run(args, ppl_seqlen=args.ppl_seqlen)


def validate_ppl(args) -> list[Path]:
    check_ppl_options(args)
    model_options(args)
    config = read_config(args.model)
    if config is not None:
        check_known_type(args.model, config)
        check_weight_shapes(args.model, config)
        check_positions(args.model, config, {"--seqlen": args.seqlen})
    return []


def validate_eval(args) -> list[Path]:
    check_zeroshot_values(args.limit, args.batch_size, ("--limit", "--batch-size"))
    model_options(args)
    if args.out is not None:
        check_output_location(args.out)
        check_name_length(args.out)
    config = read_config(args.model)
    if config is not None:
        check_known_type(args.model, config)
        check_weight_shapes(args.model, config)
    return [Path(args.out)] if args.out is not None else []


def validate_finetune(args) -> list[Path]:
    at_least(args, "checkpoint_every", 1)
    check_finetune_settings(args, name=flag)  # the rules FinetuneConfig applies, naming the flags
    teacher_options(args)
    check_ppl_options(args, "ppl-")
    zeroshot_options(args)
    model_options(args)
    check_output_location(args.out)
    check_name_length(args.out)
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
    check_name_length(args.out)
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
    export_imatrix(args)
    seed_range(args, "rotate_seed")
    if args.format == "gguf" and args.out.endswith(".gguf"):
        from slicegpt.io.imatrix import imatrix_path_for

        return [Path(args.out), imatrix_path_for(Path(args.out))]  # the slice's importance matrix goes beside it
    return [Path(args.out)]


def export_imatrix(args) -> None:
    """--imatrix FILE: a GGUF file that exists, and --quantize for it to weigh."""
    if args.imatrix is None:
        return
    if not Path(args.imatrix).is_file():
        raise SliceGPTError(f"importance matrix not found: {args.imatrix}")
    from slicegpt.io.models import check_gguf_magic

    check_gguf_magic(Path(args.imatrix))
    if not args.quantize:
        raise SliceGPTError("--imatrix weighs llama.cpp's quantization: it needs --quantize TYPE")


def validate_bench(args) -> list[Path]:
    at_least(args, "warmup", 0)
    model_options(args)
    if args.out is not None:
        check_output_location(args.out, kind="file")
        check_name_length(args.out)
    configs = {}
    for name in [args.model] + ([args.compare] if args.compare else []):
        config = read_config(name)
        if config is not None:
            check_known_type(name, config)
            if args.prompt_len >= 1 and args.new_tokens >= 1:
                check_positions(name, config, {"--prompt-len plus --new-tokens": args.prompt_len + args.new_tokens})
            configs[name] = config
    bench_memory(args, configs)
    return [Path(args.out)] if args.out is not None else []


def bench_memory(args, configs: dict[str, dict]) -> None:
    """The largest of --batch-sizes fits in memory with the weights (what config.json and the
    safetensors headers say; a model known only later is not counted)."""
    from slicegpt.io.models import DTYPES, resolve
    from slicegpt.io.shards import SafetensorsCheckpoint
    from slicegpt.running.resources import check_generation_memory, dtype_bytes

    try:
        batch = max(int(b) for b in args.batch_sizes.split(","))
    except ValueError:
        return  # the command refuses it, naming the option
    if batch < 1 or args.prompt_len < 1 or args.new_tokens < 1 or not configs:
        return
    dtype, parameters = DTYPES[args.dtype], 0
    for name in configs:
        try:
            parameters += sum(math.prod(shape) for shape in SafetensorsCheckpoint(resolve(name)).shapes().values())
        except (SliceGPTError, OSError):
            pass  # weights not at hand before loading: counted as none
    check_generation_memory(configs, parameters * dtype_bytes(dtype), batch, args.prompt_len, args.new_tokens, dtype,
                            args.device)


VALIDATORS = {"slice": validate_slice, "sweep": validate_sweep, "ppl": validate_ppl, "eval": validate_eval,
              "finetune": validate_finetune, "export": validate_export, "bench": validate_bench}


# Options that may name a path the run reads, and how a refusal names each.
READ_OPTIONS = {"model": "the model", "compare": "the --compare model", "teacher": "the --teacher model",
                "cal_data": "the --cal-data text", "ppl_data": "the --ppl-data text", "data": "the --data text",
                "heldout_data": "the --heldout-data text", "teacher_text": "the --teacher-text file",
                "imatrix": "the --imatrix file", "data_dir": "the task data in --data-dir"}


def read_paths(args) -> list[tuple[str, str]]:
    """(what, path) for every option of this command line that names something the run reads."""
    return [(what, value) for name, what in READ_OPTIONS.items() if isinstance(value := getattr(args, name, None), str)
            and value]


def validate(args) -> list[Path]:
    """Check the parsed command line; return the outputs this process holds while the run writes them."""
    from slicegpt.io.models import cache_dir

    out = getattr(args, "out", None)
    # One guard for the output of every command, first: before a named model is converted into the cache.
    check_writes([out] if out is not None else [], read_paths(args), cache_dir())
    outputs = VALIDATORS[args.command](args)
    return outputs if holds_outputs(args.command) else []
