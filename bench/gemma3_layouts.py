"""Gemma 3 270M on a reduced protocol: which layouts, and which parts of the stream, slice well.

Calibration 8 x 512 tokens of WikiText-2 (v1) validation, seed 42; perplexity on the first
2 chunks of 512 tokens of WikiText-2 raw test. Each case loads the model afresh and prints
one line; nothing is written (a probe, not protocol P).

    python bench/gemma3_layouts.py dense "target_ratio=0.85" "sparsity=0.25,rotations='block'"
    python bench/gemma3_layouts.py embeddings-only body-only   # 480 of 640 wide, per-block bases
"""

from __future__ import annotations

import sys

import torch

import harness

MODEL = "gemma3-270m"
REDUCED = dict(model=MODEL, cal_samples=8, cal_seqlen=512, cal_batch_size=4, ppl_chunks=2, ppl_seqlen=512,
               corpora=["wikitext2"])
WIDTH = 480
PARTS = {  # a case that slices one part of the stream at WIDTH and keeps the rest at full width
    "embeddings-only": lambda name: name == "embeddings",
    "body-only": lambda name: name != "embeddings",
}


def dense_or_part_ppl(case: str) -> float:
    """The dense model's perplexity, or that of one part of its stream sliced (per-block bases)."""
    from slicegpt import SliceConfig, calibration_data, load_model, perplexity
    from slicegpt.architectures.families import family_for
    from slicegpt.io.data import load_texts
    from slicegpt.running.driver import slice_layers
    from slicegpt.running.layer_store import ResidentStore

    torch.set_num_threads(harness.THREADS)
    model, tokenizer = load_model(MODEL)
    if case in PARTS:
        calibration = SliceConfig(sparsity=0.25, cal_samples=REDUCED["cal_samples"], cal_seqlen=REDUCED["cal_seqlen"],
                                  cal_batch_size=REDUCED["cal_batch_size"], seed=harness.SEED)
        batches = calibration_data(tokenizer, calibration, load_texts(str(harness.CAL_DATA)))
        config = SliceConfig(sparsity=0.25, rotations="block")
        slice_layers(ResidentStore(model, family_for(model), config, progress=False), config, batches,
                     width_rule=lambda name, ev: WIDTH if PARTS[case](name) else ev.shape[0])
    return perplexity(model, tokenizer, load_texts(str(harness.WIKITEXT_TEST)), seqlen=REDUCED["ppl_seqlen"],
                      chunks=REDUCED["ppl_chunks"], progress=False)["ppl"]


def main() -> None:
    for case in sys.argv[1:]:
        if case == "dense" or case in PARTS:
            print(f"{case}: ppl {dense_or_part_ppl(case):.2f}", flush=True)
            continue
        settings = {"sparsity": 0.25, **eval(f"dict({case})")}
        row = harness.measure_slice(harness.SliceRun(settings=settings, **REDUCED))
        print(f"{case}: width {row['width']}, rotations {row['rotations']}, pca {row['pca']}, "
              f"ppl {row['ppl_sliced']:.2f}", flush=True)


if __name__ == "__main__":
    main()
