"""slicegpt ppl MODEL_OR_DIR: perplexity of a dense or sliced model."""

from __future__ import annotations

from slicegpt.io.data import load_texts
from slicegpt.io.models import load_model
from slicegpt.evaluation.perplexity import perplexity
from slicegpt.sizing.counts import count_parameters
from slicegpt.commands.common import add_model_options, add_ppl_options, apply_threads, print_json


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("ppl", help="measure WikiText-2 perplexity of a model or sliced directory")
    parser.add_argument("model", metavar="MODEL_OR_DIR", help="smollm2-135m, gemma3-270m, a model directory, a .gguf file or a hub id")
    add_ppl_options(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a sentence")
    add_model_options(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    apply_threads(args)
    texts = load_texts(args.data, split="test")
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    result = perplexity(model, tokenizer, texts, seqlen=args.seqlen, chunks=args.chunks,
                        batch_size=args.batch_size, progress=not args.json)
    result["params"] = count_parameters(model)
    result["model"] = args.model
    if args.json:
        print_json(result)
    else:
        print(f"{args.model}: perplexity {result['ppl']:.3f} over {result['tokens']} tokens "
            f"({result['chunks']} chunks of {result['seqlen']}), {result['params']:,} parameters")
    return 0
