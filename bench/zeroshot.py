"""Zero-shot accuracy of SmolLM2-135M, dense and sliced, with and without recovery fine-tuning.

Resumable: every finished (model, task) is appended at once as one JSON line to
bench/results/zeroshot.jsonl; a rerun skips the rows already there (same model, task,
limit and settings) and measures only what is missing. Each model is built once and kept
in out/zeroshot-models/NAME, so a rerun does not slice again either.

Models, in order (calibration: 64 x 2048 tokens of WikiText-2 (v1) validation, seed 42):
    dense             SmolLM2-135M as shipped
    default-25        --sparsity 0.25 --no-refit (the default layout: one basis, normalized
                      PCA; the default until the refit became one)
    refit-25          --sparsity 0.25 (the default since: the same, plus the refit)
    paper-25          --sparsity 0.25 --rotations block --pca raw (the paper's method, no refit)
    default-25+rft    default-25, then recovery fine-tuning (LoRA, merged back)
    dense+rft         the dense model after the same fine-tuning
    default-20        --sparsity 0.20 --no-refit
    default-30        --sparsity 0.30 --rotations block (the default before one basis with the refit)
    refit-30          --sparsity 0.30 (default: one basis, refit)
Tasks: piqa, arc_easy, arc_challenge, hellaswag, winogrande, lambada_openai through
lm-evaluation-harness 0.4.13 (0-shot, the local copies of the data, the first --limit
examples of each).

    python bench/zeroshot.py                       # the protocol (--limit 500)
    python bench/zeroshot.py --models dense,default-25 --limit 50
    python bench/zeroshot.py --summary             # the table from the rows so far, no model work

Prints per model the paper's metric per task (acc_norm; acc for WinoGrande and LAMBADA),
the average, the average above chance and the retention (sliced accuracy above chance over
dense accuracy above chance); writes bench/results/zeroshot_summary.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import harness
# bench/distill.py reads these through this module too.
from harness import CAL_DATA, ROOT, append_row, git_commit, read_rows  # noqa: F401

ROWS = harness.RESULTS / "zeroshot.jsonl"
SUMMARY = harness.RESULTS / "zeroshot_summary.json"
MODEL_CACHE = ROOT / "out" / "zeroshot-models"
SPEC_FILE = "bench_spec.json"  # the spec a cached model was built from
RFT_RECORD = "rft_record.json"  # the fine-tuning's losses and held-out curve
TASKS = ["piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "lambada_openai"]
# Accuracy of guessing: two choices for PIQA and WinoGrande, four for ARC and HellaSwag;
# LAMBADA asks for the exact last word, so guessing scores nothing.
CHANCE = {"piqa": 0.5, "winogrande": 0.5, "arc_easy": 0.25, "arc_challenge": 0.25, "hellaswag": 0.25,
          "lambada_openai": 0.0}
CALIBRATION = {"cal_samples": harness.CAL_SAMPLES, "cal_seqlen": harness.CAL_SEQLEN, "seed": harness.SEED}
RFT = {"steps": 200, "seqlen": 512, "batch_size": 4, "lr": 5e-4, "lora_r": 32, "lora_alpha": 10.0, "seed": 42,
       "heldout_fraction": 0.1, "heldout_windows": 8, "eval_every": 25}
MODELS = {
    "dense": {},
    # Measured before the refit became the default: their specs say so now, so a rerun
    # rebuilds the same models.
    "default-25": {"slice": {"sparsity": 0.25, "refit": False}},
    "refit-25": {"slice": {"sparsity": 0.25, "refit": True}},
    "paper-25": {"slice": {"sparsity": 0.25, "rotations": "block", "pca": "raw"}},
    "default-25+rft": {"slice": {"sparsity": 0.25, "refit": False}, "rft": RFT},
    "dense+rft": {"rft": RFT},
    "default-20": {"slice": {"sparsity": 0.20, "refit": False}},
    "default-30": {"slice": {"sparsity": 0.30, "rotations": "block"}},
    "refit-30": {"slice": {"sparsity": 0.30}},
}


def row_key(row: dict) -> tuple:
    return row["model"], row["task"], row["limit"], json.dumps(row["spec"], sort_keys=True)


def run(models: list[str], tasks: list[str], limit: int | None, path: Path, build, evaluate, meta: dict,
        specs: dict = MODELS) -> list[dict]:
    """Measure every (model, task) not yet in `path`; build(name) -> (model, tokenizer, params) is
    called only for a model with something left to measure; evaluate(model, tokenizer, task) -> metrics."""
    rows = harness.RowsFile(path, row_key)
    done = rows.measured()
    new = []
    for name in models:
        spec = specs[name]
        todo = [t for t in tasks if (name, t, limit, json.dumps(spec, sort_keys=True)) not in done]
        if not todo:
            print(f"{name}: all {len(tasks)} tasks already measured", file=sys.stderr)
            continue
        model, tokenizer, params = build(name)
        for task in todo:
            start = time.perf_counter()
            metrics = evaluate(model, tokenizer, task)
            row = {"model": name, "task": task, "limit": limit, "spec": spec, "params": params, "metrics": metrics,
                   "seconds": round(time.perf_counter() - start, 1), **meta,
                   "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
            rows.add(row)
            new.append(row)
            print(f"{name} {task}: {metrics.get(paper_metric(task))}", file=sys.stderr)
        del model
    return new


def paper_metric(task: str) -> str:
    return "acc" if task in ("winogrande", "lambada_openai") else "acc_norm"


def summarize(rows: list[dict], tasks: list[str], limit: int | None) -> dict:
    """Per model (in MODELS order, then any other): paper metric and stderr per task, and for models
    with every task measured the average, the average above chance and the retention against dense."""
    latest: dict[str, dict[str, dict]] = {}
    for row in rows:
        if row["limit"] == limit and row["task"] in tasks:
            latest.setdefault(row["model"], {})[row["task"]] = row
    order = [m for m in MODELS if m in latest] + [m for m in latest if m not in MODELS]
    summary = {}
    for name in order:
        per_task = {}
        for task, row in latest[name].items():
            metric = paper_metric(task)
            per_task[task] = {"metric": metric, "value": row["metrics"][metric],
                              "stderr": row["metrics"].get(f"{metric}_stderr"),
                              "samples": row["metrics"].get("samples")}
        entry = {"params": next(iter(latest[name].values()))["params"],
                 "tasks": {t: per_task[t] for t in tasks if t in per_task},
                 "complete": all(t in per_task for t in tasks)}
        if entry["complete"]:
            entry["average"] = sum(per_task[t]["value"] for t in tasks) / len(tasks)
            entry["above_chance"] = sum(per_task[t]["value"] - CHANCE[t] for t in tasks) / len(tasks)
        summary[name] = entry
    dense = summary.get("dense", {}).get("above_chance")
    for name, entry in summary.items():
        if dense and "above_chance" in entry:
            entry["retention"] = entry["above_chance"] / dense
    return summary


def format_summary(summary: dict, tasks: list[str]) -> str:
    header = f"{'model':<16}{'params':>8}" + "".join(f"{t[:10]:>12}" for t in tasks) + \
        f"{'average':>9}{'>chance':>9}{'retain':>8}"
    lines = [header, "-" * len(header)]
    for name, entry in summary.items():
        cells = []
        for task in tasks:
            cell = entry["tasks"].get(task)
            cells.append(f"{100 * cell['value']:>6.1f}±{100 * (cell['stderr'] or 0):<4.1f}" if cell else f"{'-':>11}")
        tail = "".join(f"{100 * entry[k]:>{w}.1f}" if k in entry else f"{'-':>{w}}"
                       for k, w in (("average", 9), ("above_chance", 9), ("retention", 8)))
        lines.append(f"{name:<16}{entry['params'] / 1e6:>7.1f}M" + "".join(f" {c}" for c in cells) + tail)
    return "\n".join(lines)


def build_model(name: str, load_dense, cal_texts: list, specs: dict = MODELS, cache: Path = MODEL_CACHE,
                load_cached=None, progress: bool = False):
    """(model, tokenizer, real parameters) for `name`, from `cache/name` when built before;
    `cal_texts` are texts or ready batches (calibration, and the fine-tuning text)."""
    from slicegpt import SliceConfig, load_model, save_sliced, slice_model
    from slicegpt.recovery.finetune import FinetuneConfig, finetune
    from slicegpt.sizing.counts import count_parameters

    spec = specs[name]
    directory = cache / name
    spec_file = directory / SPEC_FILE
    if not spec:
        model, tokenizer = load_dense()
    elif (directory / "config.json").exists() and _same_spec(spec_file, spec):
        model, tokenizer = (load_cached or (lambda d: load_model(str(d))))(directory)
    else:
        base = _cached_slice(cache, spec) if "rft" in spec else None
        if base is not None:  # fine-tune the slice built before rather than slicing again
            model, tokenizer = (load_cached or (lambda d: load_model(str(d))))(base)
        else:
            model, tokenizer = load_dense()
        if "slice" in spec and base is None:
            config = SliceConfig(**spec["slice"], cal_data=str(CAL_DATA), **CALIBRATION)
            slice_model(model, tokenizer, config, cal_texts, progress=progress)
        record = None
        if "rft" in spec:
            # The LoRA state is checkpointed beside the model, so a stopped fine-tune continues.
            model, record = finetune(model, tokenizer, cal_texts, FinetuneConfig(**spec["rft"], data=str(CAL_DATA)),
                                     progress=progress, checkpoint_dir=str(cache / f"{name}.rft-state"),
                                     checkpoint_every=25)
        if getattr(model.config, "slicing", None) is not None:
            save_sliced(model, tokenizer, directory, overwrite=True)
        else:
            model.save_pretrained(directory)  # safetensors
            tokenizer.save_pretrained(directory)
        if record is not None:
            (directory / RFT_RECORD).write_text(json.dumps(record, indent=1) + "\n")
        spec_file.write_text(json.dumps(spec, sort_keys=True) + "\n")
    model.eval()
    return model, tokenizer, count_parameters(model)


def _cached_slice(cache: Path, spec: dict) -> Path | None:
    """A cached model built from `spec` without its fine-tuning (the same slice), if any."""
    if "slice" not in spec:
        return None
    wanted = {"slice": spec["slice"]}
    for directory in sorted(cache.glob("*")):
        if (directory / "config.json").exists() and _same_spec(directory / SPEC_FILE, wanted):
            return directory
    return None


def _same_spec(spec_file: Path, spec: dict) -> bool:
    """A cached model is reused only if it was built from the same spec (a changed RFT setting rebuilds it)."""
    return spec_file.exists() and json.loads(spec_file.read_text()) == json.loads(json.dumps(spec))


def probe_batch_sizes(sizes: list[int], task: str, limit: int, threads: int, out: Path) -> dict:
    """Seconds to evaluate dense on `task` at each lm-eval batch size (same examples each time, task
    loading included); `out` is rewritten after each size, so a stopped probe keeps what it measured."""
    from slicegpt import load_model
    from slicegpt.evaluation.zeroshot import evaluate_zeroshot

    model, tokenizer = load_model(harness.MODEL)
    probe = {"task": task, "limit": limit, "threads": threads, "commit": git_commit(),
             "date": datetime.date.today().isoformat(), "batch_sizes": {}}
    for size in sizes:
        start = time.perf_counter()
        scores = evaluate_zeroshot(model, tokenizer, [task], limit=limit, batch_size=size)
        probe["batch_sizes"][str(size)] = {"seconds": round(time.perf_counter() - start, 1),
                                           "acc": scores["tasks"][task].get("acc")}
        out.write_text(json.dumps(probe, indent=2) + "\n")
        print(f"batch {size}: {probe['batch_sizes'][str(size)]['seconds']} s", file=sys.stderr)
    return probe


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, from: " + ", ".join(MODELS))
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--limit", type=int, default=500, help="examples per task (default 500; 0: all)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="lm-eval batch size (default 8: faster than 1, bench/README.md)")
    parser.add_argument("--threads", type=int, default=harness.THREADS)
    parser.add_argument("--rows", default=str(ROWS), help="JSON-lines file of results (appended to)")
    parser.add_argument("--summary", action="store_true", help="only print and write the summary")
    parser.add_argument("--probe-batch-sizes", default=None, help="e.g. 1,4,8,16: time lm-eval batch sizes")
    parser.add_argument("--probe-task", default="hellaswag")
    parser.add_argument("--probe-limit", type=int, default=50)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    limit = args.limit or None
    tasks = [t for t in args.tasks.split(",") if t]
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        sys.exit(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    rows_path = Path(args.rows)
    if args.probe_batch_sizes:
        sizes = [int(s) for s in args.probe_batch_sizes.split(",")]
        out = harness.RESULTS / "zeroshot_batch_sizes.json"
        print(json.dumps(probe_batch_sizes(sizes, args.probe_task, args.probe_limit, args.threads, out), indent=2))
        return
    if not args.summary:
        from slicegpt import load_model
        from slicegpt.evaluation.zeroshot import evaluate_zeroshot
        from slicegpt.io.data import load_texts
        from slicegpt.io.report import versions

        cal_texts = load_texts(str(CAL_DATA))
        meta = {"batch_size": args.batch_size, "threads": args.threads, "commit": git_commit(),
                "versions": versions(), "calibration": CALIBRATION | {"data": CAL_DATA.name}}

        def evaluate(model, tokenizer, task):
            return evaluate_zeroshot(model, tokenizer, [task], limit=limit, batch_size=args.batch_size)["tasks"][task]

        run(models, tasks, limit, rows_path, lambda name: build_model(name, lambda: load_model(harness.MODEL),
                                                                       cal_texts), evaluate, meta)
    # Always over the six tasks, so that an average is never one of a subset.
    summary = summarize(read_rows(rows_path), TASKS, limit)
    harness.write_json(SUMMARY, {"limit": limit, "tasks": TASKS, "chance": CHANCE, "models": summary})
    print(f"smollm2-135m, 0-shot, first {limit} examples per task; paper metric in % ± stderr")
    print(format_summary(summary, TASKS))


if __name__ == "__main__":
    main()
