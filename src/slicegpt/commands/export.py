"""slicegpt export DIR --format plain|gguf --out PATH: a sliced model for other engines."""

from __future__ import annotations

from slicegpt.commands.common import print_json, say
from slicegpt.io.gguf_export import OUT_TYPES
from slicegpt.io.llama_quantize import QUANT_TYPES


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="write a slice with one basis (--rotations model) as a plain HF directory or a GGUF file")
    parser.add_argument("model", metavar="DIR", help="a sliced directory (no shortcuts), or a plain model directory "
                                                     "(gguf only)")
    parser.add_argument("--format", required=True, choices=["plain", "gguf"],
                        help="plain: a Hugging Face directory of the original class, no remote code; "
                             "gguf: one GGUF file for llama.cpp (Llama, Mistral, Qwen2, Qwen3)")
    parser.add_argument("--out", required=True, metavar="PATH", help="output directory (plain) or .gguf file")
    parser.add_argument("--outtype", default="f16", choices=OUT_TYPES,
                        help="gguf: matrices' type, and the type handed to the quantizer (default f16)")
    parser.add_argument("--quantize", default=None, choices=sorted(QUANT_TYPES), metavar="TYPE",
                        help=f"gguf: quantize with llama.cpp's own quantizer ({', '.join(QUANT_TYPES)})")
    parser.add_argument("--quantizer", default=None, metavar="PROGRAM",
                        help="llama-quantize, or a Python that has llama_cpp (default: llama_cpp in this Python, "
                             "else llama-quantize on PATH)")
    parser.add_argument("--imatrix", default=None, metavar="FILE",
                        help="gguf: quantize with this importance matrix (a GGUF file from llama-imatrix) instead of "
                             "the slice's own, which is written beside the output (MODEL.imatrix.gguf) and used by "
                             "default")
    parser.add_argument("--no-imatrix", dest="use_imatrix", action="store_false",
                        help="gguf: quantize without an importance matrix")
    parser.add_argument("--rotate", default="none", choices=["none", "auto", "hadamard", "random"],
                        help="gguf: fold one more orthogonal rotation of the stream into the weights (the function "
                             "is unchanged): auto = a randomized Hadamard where the width is a power of two, else "
                             "a seeded random orthogonal matrix (default none)")
    parser.add_argument("--rotate-seed", type=int, default=0, help="seed of --rotate (default 0)")
    parser.add_argument("--allow-fallback", action="store_true",
                        help="quantize even where a row length does not fit the type's block (llama.cpp then "
                             "stores those matrices as another type; the figures are printed)")
    parser.add_argument("--tokenizer-pre", default=None, metavar="NAME",
                        help="llama.cpp's pre-tokenizer name (default: from the GGUF the model came from, "
                             "else 'default')")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="dtype the model is loaded and converted in (default float32; float16 halves the "
                             "memory for large models)")
    parser.add_argument("--threads", type=int, default=2, help="quantizer threads (default 2)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run)


def run(args) -> int:
    from slicegpt.jobs.export import ExportConfig, export

    config = ExportConfig(model=args.model, out=args.out, format=args.format, out_type=args.outtype,
                          quantize=args.quantize, quantizer=args.quantizer, imatrix=args.imatrix,
                          use_imatrix=args.use_imatrix, rotate=args.rotate, rotate_seed=args.rotate_seed,
                          allow_fallback=args.allow_fallback, tokenizer_pre=args.tokenizer_pre, dtype=args.dtype,
                          threads=args.threads, overwrite=args.overwrite)
    result = export(config, warn=say)
    if args.json:
        print_json(result)
    else:
        size = f", {result['bytes']:,} bytes ({result['type']})" if "bytes" in result else ""
        print(f"wrote {result['out']}{size}")
        if result.get("quantizer"):
            weighed = f" with the importance matrix {result['imatrix']}" if result.get("imatrix") else \
                " without an importance matrix"
            print(f"quantized by {result['quantizer']}{weighed}")
    return 0
