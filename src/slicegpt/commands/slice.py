"""slicegpt slice MODEL --sparsity S --out DIR: the main job."""

from __future__ import annotations

import json
import math
from pathlib import Path

from slicegpt.running import distributed
from slicegpt.running.in_memory import calibration_data, slice_model
from slicegpt.io.importance_file import IMPORTANCE_FILE, importance_files
from slicegpt.io.checkpoint import CARD_FILE, REPORT_FILE, atomic_file, check_output_dir, save_sliced
from slicegpt.jobs.export import plain_model
from slicegpt.io.model_card import model_card
from slicegpt.config import SliceConfig
from slicegpt.io.data import load_texts
from slicegpt.errors import SliceGPTError
from slicegpt.architectures.families import family_for
from slicegpt.io.models import DTYPES, base_model_id, is_sliced_dir, load_model, resolve
from slicegpt.evaluation.perplexity import perplexity
from slicegpt.sizing.layout import REFIT_MIN_TOKENS, SHARED_FROM, refit_tokens, resolve_layout
from slicegpt.architectures.plain import to_plain_model
from slicegpt.evaluation.plots import report_plots
from slicegpt.sizing.counts import count_parameters, head_parameters, shortcut_parameters
from slicegpt.io.report import versions
from slicegpt.running.resources import (activation_bytes, available_memory, check_disk, dtype_bytes, gib,
                                       in_memory_bytes, release_memory)
from slicegpt.commands.common import apply_threads, run_zeroshot, say, timed, zeroshot_tasks
from slicegpt.commands.slice_options import (add_scale_options, add_slice_options, check_plain, describe_round_for,
                                             slice_config)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("slice", help="rotate and slice a model, save it as a Hugging Face directory")
    parser.add_argument("model", metavar="MODEL", help="smollm2-135m, gemma3-270m, a model directory, a .gguf file or a hub id")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--sparsity", type=float,
                      help="the paper's knob, in [0, 1): remove this fraction of the residual width with a basis "
                           "per block; --rotations auto keeps that real size and may spend it on another layout "
                           "(0 rotates without slicing)")
    size.add_argument("--target-params", type=int, metavar="N",
                      help="slice to at most N parameters, every parameter counted (instead of --sparsity)")
    size.add_argument("--target-ratio", type=float, metavar="R",
                      help="slice to at most R times the dense parameter count (instead of --sparsity)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    add_slice_options(parser)
    parser.add_argument("--eval-ppl", action="store_true", help="measure perplexity before and after slicing")
    add_scale_options(parser)
    parser.set_defaults(run=run)


def _refit_choice(config: SliceConfig) -> str:
    if config.refit:
        return f"on (least squares over the first {config.refit_share:g} of the calibration sequences)"
    if config.rotations == "block" or config.widths == "embedding":
        return "off (a basis per block, or only the embeddings)"
    return (f"off (it would read {refit_tokens(config):,} calibration tokens and needs {REFIT_MIN_TOKENS:,} not to "
            "overfit them: raise --cal-samples or --refit-share, or pass --refit)")


def resolve_for_cli(args, model, family, config: SliceConfig) -> SliceConfig:
    """Settle `--rotations auto` on the loaded model, say what it chose, and check --plain against it."""
    resolved = resolve_layout(model, family, config)
    if config.rotations == "auto":
        size = resolved.target_params or (resolved.target_ratio and int(resolved.target_ratio * count_parameters(model)))
        what = ("one basis for the whole model (no shortcuts)" if resolved.rotations == "model"
                else "only the embeddings sliced (a family with post-norms)" if resolved.widths == "embedding"
                else "a basis per block (per-point widths)" if resolved.widths != "uniform"
                else "a basis per block (a family with post-norms)" if family.attn_post_norm or family.mlp_post_norm
                else f"a basis per block (below {SHARED_FROM} x dense, one basis cannot follow the stream without "
                     "the refit, and --no-refit turns it off)" if config.refit is False
                else f"a basis per block (below {SHARED_FROM} x dense without the refit, one basis cannot follow "
                     f"the stream; the refit would read {refit_tokens(resolved):,} calibration tokens of the "
                     f"{REFIT_MIN_TOKENS:,} it needs)")
        say(f"rotations auto: {what}" + (f", at most {size:,} parameters" if size else ""))
    if config.refit is None:
        say("refit auto: " + _refit_choice(resolved))
    if getattr(args, "round_for", None):
        say(describe_round_for(config, args.round_to, args.round_for, model.config.hidden_size))
    check_plain_layout(args, resolved)
    return resolved


def check_plain_layout(args, resolved: SliceConfig) -> None:
    """--plain needs the layout `auto` settled on to be one basis for the whole model."""
    if args.plain and resolved.widths == "embedding":
        raise SliceGPTError("--plain needs one basis for the whole model; here only the embeddings are sliced "
                            "(--widths auto, a family with post-norms), and a plain class has no place for the "
                            "map that brings them into the stream")
    if args.plain and resolved.rotations != "model":
        raise SliceGPTError(f"--plain needs one basis for the whole model, and at this size --rotations auto picks "
                            f"a basis per block (it shares one with the refit, or from {SHARED_FROM} x dense up); "
                            "pass --rotations model")


def run(args) -> int:
    apply_threads(args)
    config = slice_config(args, args.sparsity, args.target_params, args.target_ratio)
    out = Path(args.out)
    check_output_dir(out, args.overwrite)
    check_plain(args, config)
    tasks = zeroshot_tasks(args)
    with distributed.session(args.device, args.dist_timeout) as ctx:
        streaming, reason = choose_engine(args, config)
        if config.cal_data == "teacher" and (streaming or ctx.world_size > 1):
            raise SliceGPTError("--cal-data teacher needs the whole model in one process to write the text; "
                                "add --no-streaming, or write it first and pass the JSONL")
        if streaming:
            if ctx.is_main:
                say(f"streaming mode: {reason}")
            return run_streaming(args, config, out, ctx, tasks)
        cal_texts = teacher_calibration(args, config, out) if config.cal_data == "teacher" else \
            load_texts(config.cal_data, split="train")
        ppl_texts = load_texts(args.ppl_data, split="test") if args.eval_ppl and ctx.is_main else None
        report = slice_and_save(args, config, out, cal_texts, ppl_texts, tasks, ctx=ctx)
        if ctx.is_main:
            print_summary(args.model, out, report)
        return 0


def teacher_calibration(args, config: SliceConfig, out: Path) -> list[str]:
    """--cal-data teacher: the model being sliced writes its calibration text, kept beside the output."""
    from slicegpt.recovery.teacher_text import calibration_texts

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    texts, found = calibration_texts(model, tokenizer, out.parent, args.model, config.cal_samples, config.cal_seqlen,
                                     config.seed)
    say(f"calibration text written by {args.model}: {found['path']} ({found['tokens']:,} tokens)")
    return texts


def slice_and_save(args, config: SliceConfig, out: Path, cal_texts: list[str], ppl_texts: list[str] | None,
                   tasks: list[str] | None, dense: dict | None = None,
                   ctx: distributed.DistContext | None = None) -> dict | None:
    """Load, measure the dense model, slice, measure again, save checkpoint + report + plots + card.

    `dense` holds measurements of the dense model from an earlier run ("ppl", "zeroshot"),
    so a sweep measures the dense model once. Under torchrun every rank calibrates on its
    share of the batches; only rank 0 measures and writes (the others return None).
    """
    ctx = ctx or distributed.DistContext(device=args.device)
    if dense is None:
        dense = {}
    timings: dict[str, float] = {}
    with timed(timings, "load"):
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=ctx.device)
    family = family_for(model)
    config = resolve_for_cli(args, model, family, config) if ctx.is_main else resolve_layout(model, family, config)
    if ctx.is_main:
        check_disk(out.parent, {"output": output_size_bound(model, config)})
    batches = ctx.shard(calibration_data(tokenizer, config, cal_texts))
    tasks = tasks if ctx.is_main else None

    def measure_ppl() -> float:
        return perplexity(model, tokenizer, ppl_texts, seqlen=args.ppl_seqlen, chunks=args.ppl_chunks,
                          batch_size=args.ppl_batch_size)["ppl"]

    ppl, zeroshot = {}, {}
    dense_params = count_parameters(model)
    if ppl_texts is not None:
        if "ppl" not in dense:
            with timed(timings, "ppl_dense"):
                dense["ppl"] = measure_ppl()
        ppl["dense"] = dense["ppl"]
        say(f"dense perplexity: {ppl['dense']:.3f}")
    if tasks:
        if "zeroshot" not in dense:
            with timed(timings, "zeroshot_dense"):
                dense["zeroshot"] = run_zeroshot(model, tokenizer, tasks, args)
        zeroshot["dense"] = dense["zeroshot"]
        say(f"dense zero-shot average: {100 * zeroshot['dense']['average']:.2f}")
    with timed(timings, "calibrate_and_slice"):
        result = slice_model(model, tokenizer, config, batches, progress=ctx.is_main)
    if not ctx.is_main:
        return None  # rank 0 writes the output
    if ppl_texts is not None:
        with timed(timings, "ppl_sliced"):
            ppl["sliced"] = measure_ppl()
        say(f"sliced perplexity: {ppl['sliced']:.3f}")
    if tasks:
        with timed(timings, "zeroshot_sliced"):
            zeroshot["sliced"] = run_zeroshot(model, tokenizer, tasks, args)
        say(f"sliced zero-shot average: {100 * zeroshot['sliced']['average']:.2f}")

    if args.plain:
        model = to_plain_model(model, family)
    params = {
        "dense": dense_params,
        "sliced": count_parameters(model),
        "shortcuts": shortcut_parameters(model),
        "head": head_parameters(model, family),
    }
    report = build_report(args, config, result, params, ppl, zeroshot, timings, ctx, tasks)
    spectra = {p.name: p.eigenvalues for p in result.points}
    files = {"spectra.json": json.dumps(spectra), **report_plots(report, spectra), **importance_file(result)}
    with timed(timings, "save"):
        save_sliced(model, tokenizer, out, report=report, overwrite=args.overwrite, extra_files=files)
    return report


def importance_file(result) -> dict[str, bytes]:
    """The kept linears' input importance (method/importance.py), where the run collected it."""
    return importance_files(result.importance, result.importance_tokens)


def build_report(args, config: SliceConfig, result, params: dict, ppl: dict, zeroshot: dict, timings: dict,
                 ctx: distributed.DistContext, tasks: list[str] | None = None) -> dict:
    run_config = {**config.to_dict(), "model": args.model, "base_model": base_model_id(args.model),
                  "dtype": args.dtype, "device": ctx.device, "eval_ppl": bool(ppl),
                  "ppl_data": args.ppl_data, "ppl_chunks": args.ppl_chunks, "ppl_seqlen": args.ppl_seqlen,
                  "eval_zeroshot": tasks, "zeroshot_limit": args.zeroshot_limit, "plain": args.plain,
                  "world_size": ctx.world_size}
    return {
        "config": run_config,
        "widths": {"embedding": result.embedding_width, "layers": result.layer_widths, "head_in": result.head_in},
        "params": params,
        "ppl": ppl,
        "zeroshot": zeroshot,
        "variance_kept": {p.name: round(p.variance_kept, 6) for p in result.points},
        "timings_s": timings,
        "versions": versions(),
    }


def run_streaming(args, config: SliceConfig, out: Path, ctx: distributed.DistContext, tasks) -> int:
    from transformers import AutoTokenizer

    from slicegpt.running.streaming import StreamingRun, report_spill

    timings: dict[str, float] = {}
    cal_texts = load_texts(config.cal_data, split="train")
    ppl_texts = load_texts(args.ppl_data, split="test") if args.eval_ppl and ctx.is_main else None
    source = resolve(args.model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    job = StreamingRun(source, out, config, dtype=DTYPES[args.dtype], ctx=ctx, spill=args.spill,
                       fresh=args.fresh, overwrite=args.overwrite)
    batches = ctx.shard(calibration_data(tokenizer, config, cal_texts))
    plan = job.plan(batches)
    if ctx.is_main:
        say(report_spill(plan) + f"; checkpoints in {job.directory}")
    with timed(timings, "calibrate_and_slice"):
        result = job.run(batches)
    if not ctx.is_main:
        return 0
    params = job.parameter_counts()
    report = build_report(args, job.config, result, params, {}, {}, timings, ctx, tasks)  # auto settled
    report["streaming"] = {key: value for key, value in plan.items() if key != "available_memory"}
    spectra = {p.name: p.eigenvalues for p in result.points}
    with timed(timings, "save"):
        job.finish(tokenizer, {REPORT_FILE: json.dumps(report, indent=2) + "\n", "spectra.json": json.dumps(spectra),
                               **importance_file(result)})
    if ppl_texts is not None or tasks:
        evaluate_written(args, out, source, report, ppl_texts, tasks)
    if args.plain:
        with timed(timings, "plain"):
            plain_in_place(out, report, args.dtype)
    rewrite_report(out, report, spectra)
    print_summary(args.model, out, report)
    return 0


def evaluate_written(args, out: Path, source: str, report: dict, ppl_texts: list[str] | None,
                     tasks: list[str] | None) -> None:
    """--eval-ppl and --eval-zeroshot after a streamed run, on the written output; the dense model
    is measured too where it fits in memory (streaming is often chosen because it does not)."""
    timings = report["timings_s"]

    def measure(which: str, name: str) -> None:
        model, tokenizer = load_model(name, dtype=args.dtype, device=args.device)
        if ppl_texts is not None:
            with timed(timings, f"ppl_{which}"):
                report["ppl"][which] = perplexity(model, tokenizer, ppl_texts, seqlen=args.ppl_seqlen,
                                                  chunks=args.ppl_chunks, batch_size=args.ppl_batch_size)["ppl"]
            say(f"{which} perplexity: {report['ppl'][which]:.3f}")
        if tasks:
            with timed(timings, f"zeroshot_{which}"):
                report["zeroshot"][which] = run_zeroshot(model, tokenizer, tasks, args)
            say(f"{which} zero-shot average: {100 * report['zeroshot'][which]['average']:.2f}")
        del model
        release_memory()

    dense_bytes = report["params"]["dense"] * dtype_bytes(DTYPES[args.dtype])
    free = available_memory(args.device)
    if dense_bytes * 1.2 <= free:  # the weights and some room for one forward
        measure("dense", source)
    else:
        say(f"dense model not measured: its {gib(dense_bytes)} do not fit in the {gib(free)} available")
    measure("sliced", str(out))


def plain_in_place(out: Path, report: dict, dtype: str) -> None:
    """--plain after a streamed run: the written output becomes a plain model of its own class."""
    plain, tokenizer, note = plain_model(out, dtype=dtype)
    if note:
        say(note)
    family = family_for(plain)
    report["params"].update({"sliced": count_parameters(plain), "shortcuts": 0, "head": head_parameters(plain, family)})
    save_sliced(plain, tokenizer, out, overwrite=True,
                extra_files={name: (out / name).read_bytes() for name in ("spectra.json", IMPORTANCE_FILE)
                             if (out / name).exists()})


def rewrite_report(out: Path, report: dict, spectra: dict) -> None:
    """The report, model card and plots of a written output, replaced one file at a time."""
    files = {REPORT_FILE: json.dumps(report, indent=2) + "\n", CARD_FILE: model_card(report),
             **report_plots(report, spectra)}
    for name, content in files.items():
        atomic_file(out / name, content)


def choose_engine(args, config: SliceConfig) -> tuple[bool, str]:
    """Streaming when asked, or when slicing in memory would not fit; with the reason."""
    from slicegpt.io.shards import SafetensorsCheckpoint

    if args.streaming is False:
        return False, "--no-streaming"
    source = resolve(args.model)
    local = Path(source).is_dir() and not is_sliced_dir(source)
    if args.streaming:
        if not local:
            raise SliceGPTError(f"--streaming needs a local model directory with safetensors weights, not {args.model}")
        return True, "--streaming"
    if not local:
        return False, "not a local directory"
    try:
        checkpoint = SafetensorsCheckpoint(source)
        shapes = checkpoint.shapes()
    except SliceGPTError:
        return False, "no safetensors weights"
    from transformers import AutoConfig

    width = AutoConfig.from_pretrained(source).get_text_config().hidden_size
    dtype = DTYPES[args.dtype]
    parameters = sum(math.prod(s) for s in shapes.values())
    acts = activation_bytes(config.cal_samples, config.cal_seqlen, width, dtype)
    need = in_memory_bytes(parameters, dtype, acts, max(math.prod(s) for s in shapes.values()))
    free = available_memory(args.device)
    if need <= free:
        return False, f"fits in memory ({gib(need)} of {gib(free)})"
    return True, f"slicing in memory would need about {gib(need)}, and {gib(free)} is available"


def output_size_bound(model, config: SliceConfig) -> int:
    """Bytes the sliced checkpoint takes at most: dense weights, shortcuts, an untied head."""
    text = model.config.get_text_config()
    width = config.kept_width(text.hidden_size)
    tied = bool(getattr(text, "tie_word_embeddings", False))
    extra = 2 * text.num_hidden_layers * width**2 + (text.vocab_size * text.hidden_size if tied else 0)
    return (count_parameters(model) + extra) * dtype_bytes(next(model.parameters()).dtype)


def print_summary(name: str, out: Path, report: dict) -> None:
    params, ppl, timings = report["params"], report["ppl"], report["timings_s"]
    ratio = params["sliced"] / params["dense"]
    print(f"{name} -> {out}")
    print(f"  parameters  dense {params['dense']:,}  sliced {params['sliced']:,} ({ratio:.3f}x; "
          f"shortcuts {params['shortcuts']:,}, head {params['head']:,})")
    if ppl:
        line = "  perplexity  " + "  ".join(f"{k} {v:.3f}" for k, v in ppl.items())
        if "sliced" in ppl and "dense" in ppl:
            line += f"  ({ppl['sliced'] / ppl['dense']:.3f}x)"
        print(line)
    if report.get("zeroshot"):
        from slicegpt.evaluation.zeroshot import format_table

        print("  zero-shot accuracy (%)")
        print("\n".join("    " + line for line in format_table(report["zeroshot"]).splitlines()))
    print(f"  calibrate and slice {timings['calibrate_and_slice']:.1f} s")
