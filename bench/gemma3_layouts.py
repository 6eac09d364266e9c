"""Gemma 3 270M on a reduced protocol: which layouts, and which parts of the stream, slice well.

Calibration 8 x 512 tokens of WikiText-2 (v1) validation, seed 42; perplexity on the first
2 chunks of 512 tokens of WikiText-2 raw test. Each case loads the model afresh and prints
one line; nothing is written (a probe, not protocol P).

    python bench/gemma3_layouts.py dense "target_ratio=0.85" "sparsity=0.25,rotations='block'"
    python bench/gemma3_layouts.py embeddings-only body-only   # 480 of 640 wide, per-block bases
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"
CAL, PPL = DATA / "wikitext-2-v1.validation.jsonl", DATA / "wikitext-2-raw-v1.test.jsonl"
WIDTH = 480


def main() -> None:
    from slicegpt import SliceConfig, load_model, perplexity, slice_model
    from slicegpt.architectures.families import family_for
    from slicegpt.io.data import load_texts
    from slicegpt.running.driver import slice_layers
    from slicegpt.running.layer_store import ResidentStore
    from slicegpt.running.in_memory import calibration_data

    torch.set_num_threads(2)
    ppl_texts = load_texts(str(PPL))
    for case in sys.argv[1:]:
        model, tokenizer = load_model("gemma3-270m")
        settings = {} if case in ("dense", "embeddings-only", "body-only") else eval(f"dict({case})")
        config = SliceConfig(**{"sparsity": 0.25, **settings}, cal_samples=8, cal_seqlen=512, cal_batch_size=4,
                             seed=42)
        batches = calibration_data(tokenizer, config, load_texts(str(CAL)))
        note = ""
        if case in ("embeddings-only", "body-only"):  # one part at WIDTH, the rest at full width
            sliced_part = (lambda name: name == "embeddings") if case == "embeddings-only" else \
                (lambda name: name != "embeddings")
            config = SliceConfig(sparsity=0.25, rotations="block")
            slice_layers(ResidentStore(model, family_for(model), config, progress=False), config, batches,
                         width_rule=lambda name, ev: WIDTH if sliced_part(name) else ev.shape[0])
        elif case != "dense":
            slice_model(model, tokenizer, config, batches, progress=False)
            slicing = model.config.slicing
            note = f"width {slicing['embedding_width']}, rotations {slicing['config']['rotations']}, " \
                   f"pca {slicing['config']['pca']}, "
        ppl = perplexity(model, tokenizer, ppl_texts, seqlen=512, chunks=2, progress=False)["ppl"]
        print(f"{case}: {note}ppl {ppl:.2f}", flush=True)


if __name__ == "__main__":
    main()
