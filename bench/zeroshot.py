"""Zero-shot accuracy of SmolLM2-135M: dense against 25% sliced, then after recovery fine-tuning.

Protocol: smollm2-135m, 2 threads, seed 42, calibration 64 x 2048 tokens of WikiText-2 (v1)
validation; piqa, arc_easy, arc_challenge, hellaswag, winogrande and lambada_openai through
lm-evaluation-harness (0-shot, the first 200 examples of each, local copies of the data).
Recovery fine-tuning (RFT): LoRA rank 32, alpha 10, dropout 0.05 on the attention and MLP
linears, 60 steps of 1 x 512 tokens of the same WikiText-2 (v1) validation text (the only
local training-style text; the paper used Alpaca and far more steps), peak learning rate
5e-4 (above the library's 2e-4 default, as the run is short). Short, because on 2 CPU cores
each step takes seconds and each evaluation of the six tasks tens of minutes.

    python bench/zeroshot.py                                            # the protocol
    python bench/zeroshot.py --limit 5 --cal-samples 8 --rft-steps 4    # a smoke run

Prints per-task metrics, the paper's average (acc_norm; acc for WinoGrande and LAMBADA) and
the sliced/dense ratio; writes bench/results/zeroshot.json (zeroshot_quick.json when any
setting differs from the protocol), updated after every stage.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
CAL_DATA = DATA / "wikitext-2-v1.validation.jsonl"
TASKS = "piqa,arc_easy,arc_challenge,hellaswag,winogrande,lambada_openai"
PROTOCOL = {"sparsity": 0.25, "limit": 200, "cal_samples": 64, "cal_seqlen": 2048, "threads": 2,
            "rft_steps": 60, "rft_seqlen": 512, "rft_batch_size": 1, "rft_lr": 5e-4}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, value in PROTOCOL.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value,
                            help=f"default {value}")
    parser.add_argument("--batch-size", type=int, default=16, help="lm-eval batch size (default 16)")
    parser.add_argument("--skip-rft", action="store_true", help="stop after dense and sliced")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/zeroshot[_quick].json)")
    return parser.parse_args()


def table(columns: dict[str, dict], ratio_of: tuple[str, str] | None = None) -> str:
    """Per-task metrics (acc, acc_norm) per column, the paper's average, and one ratio column."""
    from slicegpt.tasks import paper_metric

    names = list(columns)
    tasks = list(columns[names[0]]["tasks"])
    header = f"{'task':<16}{'metric':<10}" + "".join(f"{n:>14}" for n in names)
    if ratio_of:
        header += f"  {ratio_of[0] + ' / ' + ratio_of[1]:>20}"
    lines = [header, "-" * len(header)]

    def row(label: str, metric: str, values: list[float]) -> str:
        line = f"{label:<16}{metric:<10}" + "".join(f"{100 * v:>14.2f}" for v in values)
        if ratio_of:
            a, b = values[names.index(ratio_of[0])], values[names.index(ratio_of[1])]
            line += f"  {a / b:>20.3f}" if b else f"  {'-':>20}"
        return line

    for task in tasks:
        for metric in ("acc", "acc_norm"):
            if metric in columns[names[0]]["tasks"][task]:
                mark = "*" if metric == paper_metric(task) else ""
                lines.append(row(task, metric + mark, [columns[n]["tasks"][task][metric] for n in names]))
    lines.append(row("average", "(* above)", [columns[n]["average"] for n in names]))
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(42)
    quick = any(getattr(args, name) != value for name, value in PROTOCOL.items())
    out = Path(args.out or ROOT / "bench" / "results" / ("zeroshot_quick.json" if quick else "zeroshot.json"))
    out.parent.mkdir(parents=True, exist_ok=True)

    from slicegpt import SliceConfig, load_model, slice_model
    from slicegpt.running.in_memory import calibration_data
    from slicegpt.io.data import load_texts
    from slicegpt.evaluation.zeroshot import evaluate_zeroshot
    from slicegpt.running.finetune import FinetuneConfig, finetune
    from slicegpt.sizing.counts import count_parameters
from slicegpt.io.report import versions

    settings = {name: getattr(args, name) for name in PROTOCOL} | {"seed": 42, "tasks": TASKS,
                                                                     "cal_data": str(CAL_DATA)}
    record: dict = {"protocol": "zeroshot", "quick": quick, "settings": settings, "params": {}, "results": {},
                    "timings_s": {}, "versions": versions()}

    def save() -> None:
        out.write_text(json.dumps(record, indent=2) + "\n")

    def evaluate(label: str, model, tokenizer) -> None:
        start = time.perf_counter()
        record["results"][label] = evaluate_zeroshot(model, tokenizer, TASKS, limit=args.limit,
                                                     batch_size=args.batch_size)
        record["timings_s"][f"zeroshot_{label}"] = round(time.perf_counter() - start, 1)
        record["params"][label] = count_parameters(model)
        save()

    model, tokenizer = load_model("smollm2-135m")
    texts = load_texts(str(CAL_DATA))
    config = SliceConfig(sparsity=args.sparsity, cal_data=str(CAL_DATA), cal_samples=args.cal_samples,
                         cal_seqlen=args.cal_seqlen, seed=42)
    batches = calibration_data(tokenizer, config, texts)
    evaluate("dense", model, tokenizer)

    start = time.perf_counter()
    slice_model(model, tokenizer, config, batches, progress=False)
    record["timings_s"]["calibrate_and_slice"] = round(time.perf_counter() - start, 1)
    record["slice_config"] = config.to_dict()
    evaluate("sliced", model, tokenizer)
    dense, sliced = record["results"]["dense"], record["results"]["sliced"]
    record["ratio_sliced_dense"] = sliced["average"] / dense["average"]
    save()
    print(f"\nsmollm2-135m, 0-shot, first {args.limit} examples per task; accuracy in %; "
          f"params dense {record['params']['dense']:,}, sliced {record['params']['sliced']:,}")
    print(table({"dense": dense, "sliced": sliced}, ratio_of=("sliced", "dense")))

    if args.skip_rft:
        return
    rft = FinetuneConfig(steps=args.rft_steps, seqlen=args.rft_seqlen, batch_size=args.rft_batch_size,
                         lr=args.rft_lr, seed=42, data=str(CAL_DATA))
    start = time.perf_counter()
    model, training = finetune(model, tokenizer, texts, rft)
    record["timings_s"]["rft"] = round(time.perf_counter() - start, 1)
    record["rft"] = {"config": rft.to_dict(), **{k: v for k, v in training.items() if k != "losses"},
                     "losses": training["losses"]}
    evaluate("sliced+rft", model, tokenizer)
    recovered = record["results"]["sliced+rft"]
    record["ratio_rft_dense"] = recovered["average"] / dense["average"]
    save()
    print(f"\nafter RFT: {rft.steps} steps of {rft.batch_size} x {rft.seqlen} tokens of {CAL_DATA.name}, "
          f"lr {rft.lr}; loss {training['loss_first']:.3f} -> {training['loss_last']:.3f}")
    print(table({"dense": dense, "sliced": sliced, "sliced+rft": recovered}, ratio_of=("sliced+rft", "dense")))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
