"""slicegpt finetune DIR --out DIR2: recovery fine-tuning of a sliced checkpoint (LoRA or full; LM loss or KL)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from slicegpt.io.checkpoint import REPORT_FILE, check_output_dir, save_sliced
from slicegpt.io.data import load_texts
from slicegpt.errors import SliceGPTError
from slicegpt.running.distill import check_same_tokenizer
from slicegpt.running.finetune import FinetuneConfig, check_usable_text, finetune
from slicegpt.running import teacher_text
from slicegpt.io.models import is_sliced_dir, load_model
from slicegpt.evaluation.perplexity import perplexity
from slicegpt.evaluation.plots import report_plots
from slicegpt.sizing.counts import count_parameters
from slicegpt.io.report import versions
from slicegpt.commands.common import (add_model_options, add_ppl_options, add_zeroshot_options, apply_threads, run_zeroshot, say,
                     timed, zeroshot_tasks)


def add_parser(subparsers) -> None:
    defaults = FinetuneConfig()
    parser = subparsers.add_parser("finetune", help="recovery fine-tuning of a sliced checkpoint (LoRA, merged back)")
    parser.add_argument("model", metavar="DIR", help="a sliced checkpoint directory")
    parser.add_argument("--out", required=True, metavar="DIR2", help="output directory for the fine-tuned checkpoint")
    parser.add_argument("--data", default=defaults.data, metavar="PATH_OR_HUB_NAME",
                        help="training text: a .jsonl/.txt file, a hub dataset, or 'teacher' for text the teacher "
                             "writes (default: WikiText-2 train)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help=f"optimizer steps (default {defaults.steps})")
    parser.add_argument("--lr", type=float, default=defaults.lr, help=f"peak learning rate (default {defaults.lr})")
    parser.add_argument("--seqlen", type=int, default=defaults.seqlen, metavar="L",
                        help=f"tokens per training sequence (default {defaults.seqlen})")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, metavar="B",
                        help=f"sequences per step (default {defaults.batch_size})")
    parser.add_argument("--lora-r", type=int, default=defaults.lora_r, metavar="R",
                        help=f"LoRA rank (default {defaults.lora_r})")
    parser.add_argument("--lora-alpha", type=float, default=defaults.lora_alpha,
                        help=f"LoRA alpha (default {defaults.lora_alpha:g})")
    parser.add_argument("--lora-dropout", type=float, default=defaults.lora_dropout,
                        help=f"LoRA dropout (default {defaults.lora_dropout})")
    parser.add_argument("--seed", type=int, default=defaults.seed, help=f"sampling seed (default {defaults.seed})")
    parser.add_argument("--heldout-fraction", type=float, default=defaults.heldout_fraction, metavar="F",
                        help="keep the last F of the training text out of training and record its loss "
                             "(default: none)")
    parser.add_argument("--eval-every", type=int, default=50, metavar="N",
                        help="held-out loss every N steps, with --heldout-fraction (default 50)")
    parser.add_argument("--checkpoint-every", type=int, default=50, metavar="N",
                        help="save the LoRA and optimizer state every N steps beside the output; the same command "
                             "continues a stopped run from there (default 50)")
    parser.add_argument("--heldout-data", default=None, metavar="PATH_OR_HUB_NAME",
                        help="a second corpus, never trained on, whose loss joins the held-out curve")
    add_distill_options(parser, defaults)
    parser.add_argument("--eval-ppl", action="store_true", help="measure perplexity before and after fine-tuning")
    add_ppl_options(parser, prefix="ppl-")
    add_zeroshot_options(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    add_model_options(parser)
    parser.set_defaults(run=run)


def add_distill_options(parser, defaults: FinetuneConfig) -> None:
    group = parser.add_argument_group("distillation from the dense model (docs/distillation.md)")
    group.add_argument("--distill", action="store_true",
                       help="loss: KL(teacher || student) over the vocabulary at every position, T = 1")
    group.add_argument("--lm-weight", type=float, default=defaults.lm_weight, metavar="W",
                       help="with --distill: (1 - W) KL + W next-token loss (default 0: KL alone)")
    group.add_argument("--teacher", default=None, metavar="MODEL",
                       help="the teacher (default: the model the slice was made from, as its report records)")
    group.add_argument("--kl-chunk", type=int, default=defaults.kl_chunk, metavar="N",
                       help=f"positions whose logits are held at a time (default {defaults.kl_chunk})")
    group.add_argument("--autocast", choices=["bf16"], default=None,
                       help="compute the training passes in bfloat16 (weights and optimizer stay float32): about "
                            "2x faster steps on CPUs with AVX-512 BF16")
    group.add_argument("--full", action="store_true",
                       help="train every weight of the decoder layers instead of LoRA adapters (embeddings and "
                            "head frozen)")
    # Teacher options default to None so that one given without --data teacher is refused, not ignored.
    text = teacher_text.TeacherTextConfig()
    group.add_argument("--teacher-tokens", type=int, default=None, metavar="N",
                       help="with --data teacher: tokens the teacher writes (default: steps x batch x seqlen)")
    group.add_argument("--teacher-temperature", type=float, default=None,
                       help=f"sampling temperature of the teacher's text (default {text.temperature:g})")
    group.add_argument("--teacher-top-p", type=float, default=None,
                       help=f"nucleus sampling of the teacher's text (default {text.top_p:g})")
    group.add_argument("--teacher-prompts", choices=teacher_text.PROMPTS, default=None,
                       help="samples start from the beginning-of-text token, short openings of the calibration "
                            f"text, or both by turns (default {text.prompts})")
    group.add_argument("--teacher-text", default=None, metavar="PATH",
                       help="the JSONL the teacher's text is written to and reused from (default: beside --out, "
                            "named by the teacher and the sampling settings)")


TEACHER_TEXT_OPTIONS = ("teacher_tokens", "teacher_temperature", "teacher_top_p", "teacher_prompts", "teacher_text")


def teacher_name(args, source: Path) -> str:
    """--teacher, or the model the slice's report says it was made from."""
    if args.teacher:
        return args.teacher
    name = source_report(source).get("config", {}).get("model")
    if not name:
        raise SliceGPTError(f"{source} does not record the model it was made from; name the teacher with --teacher")
    return name


def teacher_settings(args, config: FinetuneConfig) -> teacher_text.TeacherTextConfig:
    """How the teacher writes for --data teacher (checked before any model is loaded)."""
    given = {field: getattr(args, f"teacher_{field}") for field in ("tokens", "temperature", "top_p", "prompts")}
    given = {field: value for field, value in given.items() if value is not None}
    return teacher_text.TeacherTextConfig(**{"tokens": config.steps * config.batch_size * config.seqlen, **given},
                                          seed=args.seed)


def teacher_data(args, settings: teacher_text.TeacherTextConfig, teacher, tokenizer, name: str, out: Path,
                 opening_source: str | None) -> tuple[list[str], dict]:
    """The teacher's text for --data teacher, written or resumed beside the output; (texts, summary)."""
    path = Path(args.teacher_text) if args.teacher_text else teacher_text.default_path(out.parent, name, settings)
    openings = load_texts(opening_source, split="train") if settings.prompts != "bos" and opening_source else None
    say(f"teacher text: {path}")
    summary = teacher_text.write_teacher_text(teacher, tokenizer, path, settings, name, openings)
    return [row["text"] for row in teacher_text.read_teacher_text(path, settings.tokens)], summary


def calibration_source(source: Path) -> str | None:
    """The calibration text the slice was made with, for the openings of teacher prompts."""
    cal = source_report(source).get("config", {}).get("cal_data")
    return cal if cal and cal != "teacher" else "wikitext2"


def source_report(directory: Path) -> dict:
    path = directory / REPORT_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def run(args) -> int:
    apply_threads(args)
    source = Path(args.model)
    if not source.is_dir() or not (is_sliced_dir(str(source)) or (source / REPORT_FILE).is_file()):
        raise SliceGPTError(f"{args.model} is not a sliced checkpoint directory (slice a model first)")
    from_teacher = args.data == "teacher"
    config = FinetuneConfig(steps=args.steps, lr=args.lr, seqlen=args.seqlen, batch_size=args.batch_size,
                            lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                            seed=args.seed, data=args.data, heldout_fraction=args.heldout_fraction,
                            eval_every=args.eval_every if args.heldout_fraction or args.heldout_data else 0,
                            distill=args.distill, lm_weight=args.lm_weight, kl_chunk=args.kl_chunk,
                            full=args.full, heldout_data=args.heldout_data, autocast=args.autocast)
    if args.lm_weight and not args.distill:
        raise SliceGPTError("--lm-weight mixes the LM loss into distillation; add --distill")
    out = Path(args.out)
    check_output_dir(out, args.overwrite)
    if args.checkpoint_every < 1:
        raise SliceGPTError(f"checkpoint-every must be at least 1, got {args.checkpoint_every}")
    partial = out.parent / f".{out.name}.rft-partial"  # training checkpoints; removed once the output is written
    tasks = zeroshot_tasks(args)
    texts = None
    if not from_teacher:
        texts = load_texts(args.data, split="train")
        check_usable_text(texts, args.data)
    heldout_texts = load_texts(args.heldout_data, split="test") if args.heldout_data else None
    ppl_texts = load_texts(args.ppl_data, split="test") if args.eval_ppl else None
    needs_teacher = args.distill or from_teacher
    text_settings = teacher_settings(args, config) if from_teacher else None
    if needs_teacher:
        config.teacher = teacher_name(args, source)

    timings: dict[str, float] = {}
    with timed(timings, "load"):
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
        teacher = None
        if needs_teacher:
            teacher, teacher_tokenizer = load_model(config.teacher, dtype=args.dtype, device=args.device)
            check_same_tokenizer(tokenizer, teacher_tokenizer, config.teacher)
    text_summary = None
    if from_teacher:
        with timed(timings, "teacher_text"):
            texts, text_summary = teacher_data(args, text_settings, teacher, tokenizer, config.teacher, out,
                                               calibration_source(source))
        check_usable_text(texts, "teacher")
        config.data = f"teacher ({text_summary['path']})"
        if not args.distill:
            teacher = None  # the LM loss on the teacher's text needs the teacher no more

    def measure(stage: str, ppl: dict, zeroshot: dict) -> None:
        if ppl_texts is not None:
            with timed(timings, f"ppl_{stage}"):
                ppl[stage] = perplexity(model, tokenizer, ppl_texts, seqlen=args.ppl_seqlen, chunks=args.ppl_chunks,
                                        batch_size=args.ppl_batch_size)["ppl"]
            say(f"perplexity {stage} fine-tuning: {ppl[stage]:.3f}")
        if tasks:
            with timed(timings, f"zeroshot_{stage}"):
                zeroshot[stage] = run_zeroshot(model, tokenizer, tasks, args)
            say(f"zero-shot average {stage} fine-tuning: {100 * zeroshot[stage]['average']:.2f}")

    ppl, zeroshot = {}, {}
    measure("before", ppl, zeroshot)
    with timed(timings, "finetune"):
        model, record = finetune(model, tokenizer, texts, config, checkpoint_dir=partial,
                                 checkpoint_every=args.checkpoint_every, teacher=teacher, heldout_texts=heldout_texts)
    if text_summary is not None:
        record["data"] |= {"source": "teacher", "teacher_text": text_summary}
    measure("after", ppl, zeroshot)

    losses = record.pop("losses")
    kls = record.pop("kl_losses", None)
    report = source_report(source)
    report.setdefault("config", {"model": args.model, **getattr(model.config, "slicing", {}).get("config", {})})
    report["finetune"] = {
        "source": str(source),
        "config": {**config.to_dict(), **({} if config.full else {"lora": {
            "r": config.lora_r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
            "targets": record["lora_targets"]}})},
        **record,
        "params_after": count_parameters(model),
        "ppl": ppl,
        "ppl_config": {"ppl_data": args.ppl_data, "ppl_seqlen": args.ppl_seqlen, "ppl_chunks": args.ppl_chunks},
        "zeroshot": zeroshot,
        "loss_curve": "loss_curve.json",
        "timings_s": timings,
        "versions": versions(),
    }
    spectra_path = source / "spectra.json"
    spectra = json.loads(spectra_path.read_text()) if spectra_path.is_file() else None
    curve = {"step": list(range(1, len(losses) + 1)), "loss": losses, "objective": record["objective"],
             "heldout": record["heldout_losses"], **({"kl": kls} if kls else {})}
    files = {"loss_curve.json": json.dumps(curve) + "\n", **report_plots(report, spectra, losses)}
    if spectra is not None:
        files["spectra.json"] = spectra_path.read_text()
    save_sliced(model, tokenizer, out, report=report, overwrite=args.overwrite, extra_files=files)
    shutil.rmtree(partial, ignore_errors=True)
    print_summary(source, out, report["finetune"])
    return 0


def print_summary(source: Path, out: Path, finetune: dict) -> None:
    config = finetune["config"]
    print(f"{source} -> {out}")
    trained = "decoder-layer parameters" if config.get("full") else "LoRA parameters, merged"
    print(f"  {config['steps']} steps of {config['batch_size']} x {config['seqlen']} tokens from {config['data']}; "
          f"{finetune['trainable_params']:,} {trained}")
    data = finetune.get("data", {})
    if data:
        print(f"  loss: {finetune.get('objective', 'next-token loss')}"
              + (f" from {config['teacher']}" if config.get("distill") else "")
              + f"; text {data['source']}, {data['tokens']:,} tokens, sha256 {data['sha256'][:12]}")
    print(f"  loss  first {finetune['loss_first']:.4f}  last {finetune['loss_last']:.4f}")
    if finetune.get("heldout_losses"):
        points = [f"step {p['step']} " + " ".join(f"{k} {v:.4f}" for k, v in p.items() if k != "step")
                  for p in finetune["heldout_losses"]]
        print("  held-out  " + "  ".join(points))
    if finetune["ppl"]:
        print("  perplexity  " + "  ".join(f"{k} {v:.3f}" for k, v in finetune["ppl"].items()))
    if finetune["zeroshot"]:
        from slicegpt.evaluation.zeroshot import format_table

        print("  zero-shot accuracy (%)")
        print("\n".join("    " + line for line in format_table(finetune["zeroshot"]).splitlines()))
