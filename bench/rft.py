"""Recovery fine-tuning (RFT) of SmolLM2-135M's 25% default slice: settings against held-out loss and perplexity.

Each variant fine-tunes the same slice (protocol P's calibration, built and cached by
bench/zeroshot.py) with LoRA on WikiText-2 (v1) validation, holding out the stream's last
tenth: its loss is recorded every 25 steps (the held-out curve). The merged model is then
measured on text it never saw: WikiText-2 raw test and the LAMBADA passages, the first 16
chunks of 2048 tokens each (protocol P's perplexity). The dense and unfine-tuned rows give
the ratios.

Resumable: a finished variant is one JSON line in bench/results/rft.jsonl, skipped on a
rerun; a fine-tune stopped midway continues from its checkpoint (out/zeroshot-models/).

    python bench/rft.py                          # every variant
    python bench/rft.py --variants lr1e-3,r64    # some
    python bench/rft.py --summary                # the table from the rows so far
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time

import harness
import zeroshot  # the model specs and the cache of built models are shared

ROWS = harness.RESULTS / "rft.jsonl"
PPL = {"chunks": harness.PPL_CHUNKS, "seqlen": harness.PPL_SEQLEN}
CORPORA = {"wikitext2_test": harness.WIKITEXT_TEST, "lambada": harness.LAMBADA}  # row field: ppl_NAME


def rft(**changes) -> dict:
    return zeroshot.RFT | changes


# Name -> zeroshot-style spec. "default-25+rft" and "dense+rft" are the zero-shot table's models.
VARIANTS = {
    "dense": {},
    "default-25": zeroshot.MODELS["default-25"],
    "default-25+rft": zeroshot.MODELS["default-25+rft"],
    "lr2e-4": {"slice": zeroshot.MODELS["default-25"]["slice"], "rft": rft(lr=2e-4)},
    "lr1e-3": {"slice": zeroshot.MODELS["default-25"]["slice"], "rft": rft(lr=1e-3)},
    "dense+rft": zeroshot.MODELS["dense+rft"],
}


def measure(name: str, spec: dict, cal_texts: list[str]) -> dict:
    from slicegpt import load_model, perplexity
    from slicegpt.io.data import load_texts

    start = time.perf_counter()
    model, tokenizer, params = zeroshot.build_model(name, lambda: load_model(harness.MODEL), cal_texts,
                                                    specs={name: spec}, progress=True)
    built = time.perf_counter() - start
    row = {"variant": name, "spec": spec, "params": params, "build_seconds": round(built, 1)}
    record_file = zeroshot.MODEL_CACHE / name / zeroshot.RFT_RECORD
    if record_file.exists():
        record = json.loads(record_file.read_text())
        row["rft"] = {k: record[k] for k in ("loss_first", "loss_last", "heldout_losses", "trainable_params",
                                             "tokens_seen", "data_tokens")}
        row["rft"]["losses"] = record["losses"]
    for key, path in CORPORA.items():
        row[f"ppl_{key}"] = perplexity(model, tokenizer, load_texts(str(path)), **PPL)["ppl"]
    row["heldout_loss"] = heldout(model, tokenizer, cal_texts)
    return row


def heldout(model, tokenizer, cal_texts: list[str]) -> float:
    """Loss on the held-out windows of the fine-tuning runs (the validation text's last tenth)."""
    from slicegpt.recovery.finetune import FinetuneConfig, heldout_loss, split_heldout, training_stream

    config = FinetuneConfig(**zeroshot.RFT, data=str(harness.CAL_DATA))
    _, windows = split_heldout(training_stream(tokenizer, cal_texts, config.seqlen), config)
    return heldout_loss(model, windows, config.batch_size)


def summary_table(rows: list[dict]) -> str:
    latest = {row["variant"]: row for row in rows}
    dense = latest.get("dense")
    lines = [f"{'variant':<16}{'params':>9}{'lr':>8}{'steps':>6}{'train loss':>16}{'held-out':>16}"
             f"{'wikitext2':>11}{'x dense':>8}{'lambada':>10}{'x dense':>8}"]
    for name, row in latest.items():
        settings = row["spec"].get("rft", {})
        train = f"{row['rft']['loss_first']:.3f}->{row['rft']['loss_last']:.3f}" if "rft" in row else "-"
        curve = row.get("rft", {}).get("heldout_losses") or []
        held = f"{curve[0]['loss']:.3f}->{curve[-1]['loss']:.3f}" if curve else \
            (f"{row['heldout_loss']:.3f}" if "heldout_loss" in row else "-")
        ratios = [row[f"ppl_{k}"] / dense[f"ppl_{k}"] if dense else float("nan") for k in ("wikitext2_test", "lambada")]
        lines.append(f"{name:<16}{row['params'] / 1e6:>8.2f}M{settings.get('lr', '-'):>8}{settings.get('steps', '-'):>6}"
                     f"{train:>16}{held:>16}{row['ppl_wikitext2_test']:>11.2f}{ratios[0]:>8.3f}"
                     f"{row['ppl_lambada']:>10.2f}{ratios[1]:>8.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=harness.THREADS)
    parser.add_argument("--rows", default=str(ROWS))
    parser.add_argument("--summary", action="store_true", help="only print the table from the rows so far")
    parser.add_argument("--again", action="store_true",
                        help="measure the variants again even if rows exist (the table uses the latest row)")
    args = parser.parse_args()
    rows = harness.RowsFile(args.rows, lambda row: (row["variant"], json.dumps(row["spec"], sort_keys=True)))
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if not args.summary:
        import torch

        from slicegpt.io.data import load_texts

        torch.set_num_threads(args.threads)
        cal_texts = load_texts(str(harness.CAL_DATA))
        done = rows.measured()
        for name in names:
            if (name, json.dumps(VARIANTS[name], sort_keys=True)) in done and not args.again:
                continue
            row = measure(name, VARIANTS[name], cal_texts)
            row |= {"commit": harness.git_commit(), "threads": args.threads, "ppl": PPL,
                    "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
            rows.add(row)
            print(f"{name}: wikitext2 {row['ppl_wikitext2_test']:.2f}, lambada {row['ppl_lambada']:.2f}",
                  file=sys.stderr)
    print(summary_table(rows.rows()))


if __name__ == "__main__":
    main()
