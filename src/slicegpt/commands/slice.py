"""slicegpt slice MODEL --sparsity S --out DIR: the main job."""

from __future__ import annotations

import json
from pathlib import Path

from ..api import calibration_data, slice_model
from ..checkpoint import check_output_dir, save_sliced
from ..config import SliceConfig
from ..data import load_texts
from ..errors import SliceGPTError
from ..families import family_for
from ..models import load_model
from ..perplexity import perplexity
from ..plain import to_plain_model
from ..report import count_parameters, head_parameters, shortcut_parameters, versions
from .common import add_model_options, add_ppl_options, apply_threads, say, timed


def add_parser(subparsers) -> None:
    defaults = SliceConfig()
    parser = subparsers.add_parser("slice", help="rotate and slice a model, save it as a Hugging Face directory")
    parser.add_argument("model", metavar="MODEL", help="smollm2-135m, a model directory, a .gguf file or a hub id")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--sparsity", type=float,
                      help="fraction of the residual width to remove, in [0, 1); 0 rotates without slicing")
    size.add_argument("--target-params", type=int, metavar="N",
                      help="slice to at most N parameters, every parameter counted (instead of --sparsity)")
    size.add_argument("--target-ratio", type=float, metavar="R",
                      help="slice to at most R times the dense parameter count (instead of --sparsity)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--round-to", type=int, default=defaults.round_to, metavar="M",
                        help=f"round the kept width down to a multiple of M (default {defaults.round_to})")
    parser.add_argument("--cal-data", default=defaults.cal_data, metavar="PATH_OR_HUB_NAME",
                        help="calibration text: a .jsonl/.txt file or a hub dataset (default: WikiText-2 train)")
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
                        help="where the basis changes: block (default; two shortcuts per layer), layer (one), "
                             "group:K (K layers share one), model (one basis, no shortcuts)")
    parser.add_argument("--widths", default=defaults.widths, choices=["uniform", "variance"],
                        help="uniform (default): one width everywhere; variance: per-layer widths from the "
                             "eigenvalue spectra, at the same real size")
    parser.add_argument("--pca", default=defaults.pca, choices=["raw", "normalized"],
                        help="raw: PCA of the stream as it is; normalized: every token weighed equally")
    parser.add_argument("--seed", type=int, default=defaults.seed, help=f"sampling seed (default {defaults.seed})")
    parser.add_argument("--eval-ppl", action="store_true", help="measure perplexity before and after slicing")
    add_ppl_options(parser, prefix="ppl-")
    parser.add_argument("--plain", action="store_true",
                        help="with --rotations model: save a plain model of the original class "
                             "(smaller hidden size, no remote code needed)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    add_model_options(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    apply_threads(args)
    config = SliceConfig(sparsity=args.sparsity or 0.0, target_params=args.target_params,
                         target_ratio=args.target_ratio, round_to=args.round_to, cal_data=args.cal_data,
                         cal_samples=args.cal_samples, cal_seqlen=args.cal_seqlen,
                         cal_batch_size=args.cal_batch_size, seed=args.seed,
                         tied_head=not args.untie_head, rotations=args.rotations,
                         widths=args.widths, pca=args.pca, tied_head_basis=args.tied_head_basis)
    out = Path(args.out)
    check_output_dir(out, args.overwrite)
    if args.plain and config.rotations != "model":
        raise SliceGPTError("--plain needs --rotations model (a model without shortcuts)")
    timings: dict[str, float] = {}

    cal_texts = load_texts(config.cal_data, split="train")
    ppl_texts = load_texts(args.ppl_data, split="test") if args.eval_ppl else None
    with timed(timings, "load"):
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    family = family_for(model)
    batches = calibration_data(tokenizer, config, cal_texts)

    def measure_ppl() -> float:
        return perplexity(model, tokenizer, ppl_texts, seqlen=args.ppl_seqlen, chunks=args.ppl_chunks,
                          batch_size=args.ppl_batch_size)["ppl"]

    ppl = {}
    dense_params = count_parameters(model)
    if args.eval_ppl:
        with timed(timings, "ppl_dense"):
            ppl["dense"] = measure_ppl()
        say(f"dense perplexity: {ppl['dense']:.3f}")
    with timed(timings, "calibrate_and_slice"):
        result = slice_model(model, tokenizer, config, batches)
    if args.eval_ppl:
        with timed(timings, "ppl_sliced"):
            ppl["sliced"] = measure_ppl()
        say(f"sliced perplexity: {ppl['sliced']:.3f}")

    if args.plain:
        model = to_plain_model(model, family)
    params = {
        "dense": dense_params,
        "sliced": count_parameters(model),
        "shortcuts": shortcut_parameters(model),
        "head": head_parameters(model, family),
    }
    run_config = {**config.to_dict(), "model": args.model, "dtype": args.dtype, "device": args.device,
                  "eval_ppl": args.eval_ppl, "ppl_data": args.ppl_data, "ppl_chunks": args.ppl_chunks,
                  "ppl_seqlen": args.ppl_seqlen, "plain": args.plain}
    report = {
        "config": run_config,
        "widths": {"embedding": result.embedding_width, "layers": result.layer_widths, "head_in": result.head_in},
        "params": params,
        "ppl": ppl,
        "variance_kept": {p.name: round(p.variance_kept, 6) for p in result.points},
        "timings_s": timings,
        "versions": versions(),
    }
    spectra = {p.name: p.eigenvalues for p in result.points}
    with timed(timings, "save"):
        save_sliced(model, tokenizer, out, report=report, overwrite=args.overwrite,
                    extra_files={"spectra.json": json.dumps(spectra)})
    print_summary(args.model, out, params, ppl, timings)
    return 0


def print_summary(name: str, out: Path, params: dict, ppl: dict, timings: dict) -> None:
    ratio = params["sliced"] / params["dense"]
    print(f"{name} -> {out}")
    print(f"  parameters  dense {params['dense']:,}  sliced {params['sliced']:,} ({ratio:.3f}x; "
          f"shortcuts {params['shortcuts']:,}, head {params['head']:,})")
    if ppl:
        line = "  perplexity  " + "  ".join(f"{k} {v:.3f}" for k, v in ppl.items())
        if "sliced" in ppl and "dense" in ppl:
            line += f"  ({ppl['sliced'] / ppl['dense']:.3f}x)"
        print(line)
    print(f"  calibrate and slice {timings['calibrate_and_slice']:.1f} s")
