"""slicegpt finetune DIR --out DIR2: recovery fine-tuning of a sliced checkpoint with LoRA."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from slicegpt.io.checkpoint import REPORT_FILE, check_output_dir, save_sliced
from slicegpt.io.data import load_texts
from slicegpt.errors import SliceGPTError
from slicegpt.running.finetune import FinetuneConfig, check_usable_text, finetune
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
                        help="training text: a .jsonl/.txt file or a hub dataset (default: WikiText-2 train)")
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
    parser.add_argument("--eval-ppl", action="store_true", help="measure perplexity before and after fine-tuning")
    add_ppl_options(parser, prefix="ppl-")
    add_zeroshot_options(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    add_model_options(parser)
    parser.set_defaults(run=run)


def source_report(directory: Path) -> dict:
    path = directory / REPORT_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def run(args) -> int:
    apply_threads(args)
    source = Path(args.model)
    if not source.is_dir() or not (is_sliced_dir(str(source)) or (source / REPORT_FILE).is_file()):
        raise SliceGPTError(f"{args.model} is not a sliced checkpoint directory (slice a model first)")
    config = FinetuneConfig(steps=args.steps, lr=args.lr, seqlen=args.seqlen, batch_size=args.batch_size,
                            lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                            seed=args.seed, data=args.data, heldout_fraction=args.heldout_fraction,
                            eval_every=args.eval_every if args.heldout_fraction else 0)
    out = Path(args.out)
    check_output_dir(out, args.overwrite)
    if args.checkpoint_every < 1:
        raise SliceGPTError(f"checkpoint-every must be at least 1, got {args.checkpoint_every}")
    partial = out.parent / f".{out.name}.rft-partial"  # training checkpoints; removed once the output is written
    tasks = zeroshot_tasks(args)
    texts = load_texts(args.data, split="train")
    check_usable_text(texts, args.data)
    ppl_texts = load_texts(args.ppl_data, split="test") if args.eval_ppl else None

    timings: dict[str, float] = {}
    with timed(timings, "load"):
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)

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
                                 checkpoint_every=args.checkpoint_every)
    measure("after", ppl, zeroshot)

    losses = record.pop("losses")
    report = source_report(source)
    report.setdefault("config", {"model": args.model, **getattr(model.config, "slicing", {}).get("config", {})})
    report["finetune"] = {
        "source": str(source),
        "config": {**config.to_dict(), "lora": {"r": config.lora_r, "alpha": config.lora_alpha,
                                                 "dropout": config.lora_dropout, "targets": record["lora_targets"]}},
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
    files = {"loss_curve.json": json.dumps({"step": list(range(1, len(losses) + 1)), "loss": losses,
                                            "heldout": record["heldout_losses"]}) + "\n",
             **report_plots(report, spectra, losses)}
    if spectra is not None:
        files["spectra.json"] = spectra_path.read_text()
    save_sliced(model, tokenizer, out, report=report, overwrite=args.overwrite, extra_files=files)
    shutil.rmtree(partial, ignore_errors=True)
    print_summary(source, out, report["finetune"])
    return 0


def print_summary(source: Path, out: Path, finetune: dict) -> None:
    config = finetune["config"]
    print(f"{source} -> {out}")
    print(f"  {config['steps']} steps of {config['batch_size']} x {config['seqlen']} tokens from {config['data']}; "
          f"{finetune['trainable_params']:,} LoRA parameters, merged")
    print(f"  loss  first {finetune['loss_first']:.4f}  last {finetune['loss_last']:.4f}")
    if finetune.get("heldout_losses"):
        print("  held-out loss  " + "  ".join(f"step {p['step']} {p['loss']:.4f}" for p in finetune["heldout_losses"]))
    if finetune["ppl"]:
        print("  perplexity  " + "  ".join(f"{k} {v:.3f}" for k, v in finetune["ppl"].items()))
    if finetune["zeroshot"]:
        from slicegpt.evaluation.zeroshot import format_table

        print("  zero-shot accuracy (%)")
        print("\n".join("    " + line for line in format_table(finetune["zeroshot"]).splitlines()))
