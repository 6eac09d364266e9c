"""A tied LayerNorm head stays tied: real size of an OPT-125M-shaped model sliced at 25%.

No OPT weights are available offline, so the model has OPT-125M's shape (hidden 768, 12
layers, 12 heads, FFN 3072, vocabulary 50,272, 2048 positions, tied head) and random
weights; SmolLM2's tokenizer stands in for OPT's (its ids are all below 50,272). Random
weights make perplexity show only that nothing broke, not quality. Three CLI runs:

- default: `--sparsity 0.25` (head tied through the mean axis, auto layout);
- untied, same size: `--untie-head --target-params <the default's real size>`;
- untied, 25%: `--untie-head --sparsity 0.25 --rotations block` (what 25% gave before the
  head stayed tied).

    python bench/tied_layernorm.py            # writes bench/results/tied_layernorm.json
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import harness

MODEL_DIR = Path("/tmp/slicegpt-opt125m-random")
WORK = Path("/tmp/slicegpt-opt125m-sliced")
TOKENIZER = Path.home() / ".cache" / "slicegpt" / harness.MODEL
DENSE_PARAMS = 125_239_296
COMMON = ["--cal-data", str(harness.CAL_DATA), "--cal-samples", "8", "--cal-seqlen", "256", "--eval-ppl",
          "--ppl-data", str(harness.WIKITEXT_TEST), "--ppl-chunks", "4", "--ppl-seqlen", "256", "--threads", "2",
          "--overwrite"]


def build_model() -> None:
    import torch
    import transformers

    if (MODEL_DIR / "config.json").exists():
        return
    config = transformers.OPTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072,
                                    vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=768,
                                    do_layer_norm_before=True, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(config)
    count = sum(p.numel() for p in model.parameters())
    assert count == DENSE_PARAMS, count
    model.save_pretrained(MODEL_DIR)
    transformers.AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(MODEL_DIR)


def slice_with(name: str, options: list[str]) -> dict:
    out = WORK / name
    command = harness.slicegpt_command("slice", str(MODEL_DIR), *options, "--out", str(out), *COMMON)
    print("$ slicegpt " + " ".join(command[3:]), flush=True)
    subprocess.run(command, check=True)
    report = json.loads((out / "slicing_report.json").read_text())
    slicing = json.loads((out / "config.json").read_text())["slicing"]
    return {"name": name, "options": options, "params": report["params"], "ppl": report["ppl"],
            "tied_head": slicing["tied_head"], "mean_axis": slicing.get("mean_axis", False),
            "rotations": slicing["config"]["rotations"], "width": slicing["embedding_width"]}


def main() -> None:
    build_model()
    rows = [slice_with("default", ["--sparsity", "0.25"])]
    same_size = rows[0]["params"]["sliced"]
    rows.append(slice_with("untied-same-size", ["--untie-head", "--target-params", str(same_size)]))
    rows.append(slice_with("untied-25", ["--untie-head", "--sparsity", "0.25", "--rotations", "block"]))
    print(f"\n{'run':<18} {'params':>13} {'x dense':>8} {'tied':>5} {'layout':>7} {'width':>6} {'ppl':>10}")
    for row in rows:
        params = row["params"]["sliced"]
        print(f"{row['name']:<18} {params:>13,} {params / DENSE_PARAMS:>8.3f} {str(row['tied_head']):>5} "
              f"{row['rotations']:>7} {row['width']:>6} {row['ppl']['sliced']:>10.1f}")
    print(f"dense perplexity {rows[0]['ppl']['dense']:.1f}")
    target = harness.RESULTS / "tied_layernorm.json"
    harness.write_json(target, {"dense_params": DENSE_PARAMS, "runs": rows})
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
