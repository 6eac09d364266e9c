"""The options of `slicegpt slice` (shared with `sweep`) and the SliceConfig they make."""

from __future__ import annotations

import argparse

from slicegpt.commands.common import add_model_options, add_ppl_options, add_zeroshot_options
from slicegpt.config import PAPER_METHOD, WIDTHS, SliceConfig
from slicegpt.errors import SliceGPTError
from slicegpt.sizing.layout import SHARED_FROM


def add_scale_options(parser) -> None:
    scale = parser.add_argument_group("large models, several processes, resuming")
    scale.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=None,
                       help="slice one layer at a time from the safetensors shards, checkpointing after each "
                            "(default: only when the model would not fit in available memory)")
    scale.add_argument("--spill", choices=("auto", "always", "never"), default="auto",
                       help="streaming: keep calibration activations in a file on disk (default: when they "
                            "would not fit in memory)")
    scale.add_argument("--fresh", action="store_true",
                       help="streaming: discard an interrupted run's checkpoints instead of resuming them")
    scale.add_argument("--dist-timeout", type=float, default=1800.0, metavar="SECONDS",
                       help="under torchrun: how long a rank waits for the others before giving up (default 1800)")


def add_slice_options(parser) -> None:
    """Everything `slice` takes besides the model, the sparsity and the output (shared with `sweep`)."""
    defaults = SliceConfig()
    parser.add_argument("--round-to", type=int, default=defaults.round_to, metavar="M",
                        help=f"round the kept width down to a multiple of M (default {defaults.round_to})")
    parser.add_argument("--round-for", default=None, metavar="GGUF_TYPE",
                        help="round the kept width down to the block of a llama.cpp quantization (Q8_0, Q4_0, Q5_0: "
                             "32; the K-quants Q6_K, Q4_K_M, ...: 256), so every matrix quantizes to that type; "
                             "the width it costs is printed")
    parser.add_argument("--cal-data", default=defaults.cal_data, metavar="PATH_OR_HUB_NAME",
                        help="calibration text: a .jsonl/.txt file, a hub dataset, or 'teacher' for text the model "
                             "writes itself, kept beside the output (default: WikiText-2 train)")
    parser.add_argument("--cal-samples", type=int, default=defaults.cal_samples, metavar="N",
                        help=f"calibration sequences (default {defaults.cal_samples})")
    parser.add_argument("--cal-seqlen", type=int, default=defaults.cal_seqlen, metavar="L",
                        help=f"tokens per calibration sequence (default {defaults.cal_seqlen})")
    parser.add_argument("--cal-batch-size", type=int, default=defaults.cal_batch_size, metavar="B",
                        help=f"sequences per calibration batch (default {defaults.cal_batch_size})")
    parser.add_argument("--untie-head", action="store_true",
                        help="give a tied head its own sliced matrix instead of a small map after the final norm")
    parser.add_argument("--tied-head-basis", default=defaults.tied_head_basis, choices=["joint", "input"],
                        help="basis a tied head shares with the embeddings: joint (default; PCA of both) or input")
    parser.add_argument("--rotations", default=defaults.rotations, metavar="MODE",
                        help="where the basis changes: auto (default: model, or block below 0.8 x dense when the refit "
                             "is off), "
                             "block (two shortcuts per layer), layer (one), group:K (K layers share one), "
                             "model (one basis, no shortcuts)")
    parser.add_argument("--widths", default=defaults.widths, choices=list(WIDTHS),
                        help="uniform: one width everywhere; variance: per-layer widths from the eigenvalue "
                             "spectra, at the same real size; embedding: slice only the embeddings (and a tied "
                             "head), every layer keeps its width and weights; auto (default): embedding for "
                             "families with post-norms (Gemma-2/3, OLMo-2) where it keeps half the width or more, "
                             "else uniform")
    parser.add_argument("--pca", default=defaults.pca, choices=["auto", "raw", "normalized"],
                        help="raw: PCA of the stream as it is; normalized: every token weighed equally; "
                             "auto (default): normalized with one basis for the whole model, else raw")
    parser.add_argument("--refit", action=argparse.BooleanOptionalAction, default=None,
                        help="refit each layer's output projections by least squares on the calibration text "
                             "(default: on with shared bases, off with per-block bases or embedding widths)")
    parser.add_argument("--basis-share", type=float, default=defaults.basis_share, metavar="F",
                        help="shared bases (layer, group:K, model) from the covariances of the first F of the "
                             f"calibration sequences (default {defaults.basis_share:g}: all)")
    parser.add_argument("--refit-share", type=float, default=defaults.refit_share, metavar="F",
                        help="with shared bases, the refit fits on the first F of the calibration sequences "
                             "(default: 0.25 from 0.8 x dense up, all of them below)")
    parser.add_argument("--paper", action="store_true",
                        help="the paper's method exactly, for comparisons: --rotations block --pca raw "
                             "--widths uniform --no-refit --untie-head")
    parser.add_argument("--seed", type=int, default=defaults.seed, help=f"sampling seed (default {defaults.seed})")
    add_ppl_options(parser, prefix="ppl-")
    add_zeroshot_options(parser)
    parser.add_argument("--plain", action="store_true",
                        help="with one basis for the whole model (--rotations model, or what auto picks): "
                             "save a plain model of the original class "
                             "(smaller hidden size, no remote code needed)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    add_model_options(parser)


def method_settings(args) -> dict:
    """The method options as given; `--paper` fixes them all, and refuses any that disagree."""
    given = {"rotations": args.rotations, "pca": args.pca, "widths": args.widths,
             "refit": SliceConfig.refit if args.refit is None else args.refit, "tied_head": not args.untie_head}
    if not getattr(args, "paper", False):
        return given
    defaults = {"rotations": "auto", "pca": "auto", "widths": "auto", "refit": None, "tied_head": True}
    explicit = {**given, "refit": args.refit}
    for name, value in PAPER_METHOD.items():
        if explicit[name] not in (defaults[name], value):
            flag = {"tied_head": "--untie-head", "refit": "--refit"}.get(name, f"--{name}")
            raise SliceGPTError(f"--paper uses {name}={value}; drop {flag} (given: {explicit[name]})")
    return dict(PAPER_METHOD)


def round_for(round_to: int, gguf_type: str | None) -> int:
    """`round_to`, made a multiple of the block of llama.cpp's quantization `gguf_type`."""
    if gguf_type is None:
        return round_to
    import math

    from slicegpt.io.llama_quantize import block_size, check_quant_type

    return math.lcm(round_to, block_size(check_quant_type(gguf_type)))


def describe_round_for(config: SliceConfig, given_round_to: int, gguf_type: str, dense: int) -> str:
    """What rounding the widths for `gguf_type` costs: the kept width with and without it."""
    block = config.round_to
    if config.sparsity == 0 or config.target_params or config.target_ratio:
        return (f"--round-for {gguf_type}: widths are multiples of {block} (dense width {dense}"
                + ("; a width that is not stays dense" if dense % block else "") + ")")
    wanted = int((1.0 - config.sparsity) * dense)
    wanted -= wanted % given_round_to
    kept = config.kept_width(dense)
    up = min(-(-wanted // block) * block, dense)
    return (f"--round-for {gguf_type}: kept width {kept} of {dense} (a multiple of {block}) instead of {wanted}: "
            f"{100 * kept / dense:.0f}% of the stream instead of {100 * wanted / dense:.0f}%; "
            f"the next width that fits, {up}, is sparsity {1 - up / dense:.3f}")


def slice_config(args, sparsity: float | None, target_params: int | None = None,
                 target_ratio: float | None = None) -> SliceConfig:
    return SliceConfig(sparsity=sparsity or 0.0, target_params=target_params, target_ratio=target_ratio,
                       round_to=round_for(args.round_to, getattr(args, "round_for", None)), cal_data=args.cal_data, cal_samples=args.cal_samples,
                       cal_seqlen=args.cal_seqlen, cal_batch_size=args.cal_batch_size, seed=args.seed,
                       tied_head_basis=args.tied_head_basis, basis_share=args.basis_share,
                       refit_share=args.refit_share,
                       **method_settings(args))


def check_plain(args, config: SliceConfig) -> None:
    if args.plain and config.rotations not in ("model", "auto"):
        raise SliceGPTError("--plain needs one basis for the whole model: --rotations model (or auto, which "
                            f"picks it with the refit, or from {SHARED_FROM} x dense up), not {config.rotations}")
