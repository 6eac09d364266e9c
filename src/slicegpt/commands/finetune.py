"""slicegpt finetune DIR --out DIR2: recovery fine-tuning of a sliced checkpoint (LoRA or full; LM loss or KL)."""

from __future__ import annotations

from pathlib import Path

from slicegpt.errors import SliceGPTError
from slicegpt.jobs.recover import RecoverConfig, recover, teacher_text_settings
from slicegpt.recovery import teacher_text
from slicegpt.recovery.finetune import FinetuneConfig
from slicegpt.commands.common import (add_model_options, add_ppl_options, add_zeroshot_options, apply_threads,
                                     zeroshot_tasks)


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


def run(args) -> int:
    apply_threads(args)
    training = FinetuneConfig(steps=args.steps, lr=args.lr, seqlen=args.seqlen, batch_size=args.batch_size,
                              lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                              seed=args.seed, data=args.data, heldout_fraction=args.heldout_fraction,
                              eval_every=args.eval_every if args.heldout_fraction or args.heldout_data else 0,
                              distill=args.distill, lm_weight=args.lm_weight, kl_chunk=args.kl_chunk,
                              teacher=args.teacher, full=args.full, heldout_data=args.heldout_data,
                              autocast=args.autocast)
    if args.lm_weight and not args.distill:
        raise SliceGPTError("--lm-weight mixes the LM loss into distillation; add --distill")
    text_config = None
    if args.data == "teacher":
        given = {field: getattr(args, f"teacher_{field}") for field in ("tokens", "temperature", "top_p", "prompts")}
        text_config = teacher_text_settings(training, **{k: v for k, v in given.items() if v is not None})
    config = RecoverConfig(model=args.model, out=args.out, training=training, checkpoint_every=args.checkpoint_every,
                           teacher_text_config=text_config, teacher_text_file=args.teacher_text,
                           eval_ppl=args.eval_ppl, ppl_data=args.ppl_data, ppl_seqlen=args.ppl_seqlen,
                           ppl_chunks=args.ppl_chunks, ppl_batch_size=args.ppl_batch_size,
                           zeroshot_tasks=zeroshot_tasks(args), zeroshot_limit=args.zeroshot_limit,
                           zeroshot_batch_size=args.zeroshot_batch_size, data_dir=args.data_dir, dtype=args.dtype,
                           device=args.device, overwrite=args.overwrite)
    result = recover(config)
    print_summary(result.source, result.out, result.report["finetune"])
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
