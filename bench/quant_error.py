"""Why slices lose more to 4-bit quantization: per-tensor quantization error weighted by the activations.

For SmolLM2-135M dense and its slices (directories made by bench/llama_cpp_quant.py or
`slicegpt slice`), every linear's weight W is quantized block-wise as llama.cpp stores it
without an importance matrix (gguf-py's reference Q4_0 / Q8_0, the same rounding as
llama.cpp's reference quantizer), and the error is measured three ways:
- `weighted`: sum_oi s_i (W - W_q)_oi^2 / sum_oi s_i W_oi^2, with s_i the mean square of
  input column i on calibration text (hooks on the model itself, 8 protocol-P windows).
  It is the expected relative output error ||(W - W_q) x||^2 / ||W x||^2 when the input's
  coordinates are uncorrelated (nearly so in a PCA basis);
- `plain`: the same with every s_i = 1 (what an unweighted quantizer minimises);
- `concentration`: the input columns' energy shares: the share of the first 32 columns
  (one quantization block) and the effective number of columns, (sum s)^2 / sum s^2.
The figures are averaged over layers per kind of tensor (attn_q, ..., ffn_down, output).

    python bench/quant_error.py --models dense=smollm2-135m 25%=/path/to/slice [--type Q4_0]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slicegpt.method.importance import InputSquares

import harness

RESULTS = harness.RESULTS / "quant_error.json"


def input_squares(model: nn.Module, batches: list[dict]) -> dict[str, torch.Tensor]:
    """Mean squares of every linear's input per column, by the slicing run's own accumulator."""
    paths = {name: name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    squares = InputSquares()
    with torch.no_grad(), squares.watching(model, paths):
        for batch in batches:
            model(input_ids=batch["input_ids"])
    return {name: total / squares.tokens[name] for name, total in squares.sums.items()}


def quantized(weight: np.ndarray, qtype: str) -> np.ndarray:
    import gguf
    from gguf import quants

    kind = getattr(gguf.GGMLQuantizationType, qtype)
    return quants.dequantize(quants.quantize(weight, kind), kind).reshape(weight.shape)


def kind_of(name: str) -> str:
    if name == "lm_head":
        return "output"
    return name.split(".", 3)[-1]


def tensor_errors(model: nn.Module, squares: dict[str, torch.Tensor], qtype: str) -> dict[str, dict]:
    rows = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name not in squares:
            continue
        W = module.weight.detach().float().numpy()
        if W.shape[1] % 32:
            continue
        s = squares[name].numpy()
        err = (W - quantized(W, qtype)).astype(np.float64) ** 2
        W2 = W.astype(np.float64) ** 2
        shares = s / s.sum()
        rows[name] = {"weighted": float((err * s).sum() / (W2 * s).sum()), "plain": float(err.sum() / W2.sum()),
                      "first_block_share": float(shares[:32].sum()),
                      "effective_columns": float(1.0 / (shares ** 2).sum()), "columns": int(W.shape[1])}
    return rows


def by_kind(rows: dict[str, dict]) -> dict[str, dict]:
    groups = defaultdict(list)
    for name, row in rows.items():
        groups[kind_of(name)].append(row)
    return {kind: {key: float(np.mean([r[key] for r in group])) for key in group[0]} for kind, group in groups.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, metavar="LABEL=DIR")
    parser.add_argument("--type", default="Q4_0", choices=["Q4_0", "Q8_0"])
    parser.add_argument("--windows", type=int, default=8, help="protocol-P calibration windows (default 8)")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from slicegpt.io.data import calibration_batches, load_texts
    from slicegpt.jobs.export import plain_model
    from slicegpt.io.models import resolve

    torch.set_grad_enabled(False)
    results = {}
    for spec in args.models:
        label, _, source = spec.partition("=")
        directory = resolve(source) if not Path(source).is_dir() else source
        model, tokenizer, _ = plain_model(directory)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(directory)
        batches = calibration_batches(tokenizer, load_texts(str(harness.CAL_DATA)), harness.CAL_SAMPLES,
                                      harness.CAL_SEQLEN, 1, harness.SEED)[: args.windows]
        print(f"{label}: input statistics ...", file=sys.stderr, flush=True)
        squares = input_squares(model.eval(), batches)
        rows = tensor_errors(model, squares, args.type)
        results[label] = {"hidden_size": model.config.hidden_size, "by_kind": by_kind(rows), "tensors": rows}
    harness.write_json(RESULTS, {"command": "python bench/quant_error.py " + " ".join(sys.argv[1:]),
                                 "date": time.strftime("%Y-%m-%d"), "type": args.type, "models": results})
    kinds = list(next(iter(results.values()))["by_kind"])
    print(f"{'kind':<22}" + "".join(f"{label + ' weighted':>18}{label + ' plain':>15}{label + ' 1st32':>13}"
                                    for label in results))
    for kind in kinds:
        line = f"{kind:<22}"
        for label, result in results.items():
            row = result["by_kind"].get(kind)
            line += (f"{row['weighted']:>18.4f}{row['plain']:>15.4f}{row['first_block_share']:>13.3f}" if row
                     else " " * 46)
        print(line)


if __name__ == "__main__":
    main()
