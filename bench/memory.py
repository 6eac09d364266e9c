"""Peak memory of `slicegpt slice` in memory, against the model's own bytes.

Each case runs `slicegpt slice MODEL --sparsity 0.25 --eval-ppl ...` in a child process,
with protocol P's calibration (64 x 2048 tokens of WikiText-2 validation) unless told
otherwise; its peak RSS is the child's own (wait4), and a sampler records RSS over time,
so the JSON shows where the peak falls. A case may set environment variables (the
allocator's, for instance) or add slice options.

    python bench/memory.py                                   # the default case
    python bench/memory.py --cases default,no-refit --tag refit
    python bench/memory.py --cal-samples 16 --ppl-chunks 2   # a quicker look
Writes bench/results/memory[_TAG].json (cases merge across runs) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import harness

# name -> (extra slice options, extra environment)
CASES = {
    "default": ([], {}),
    "no-refit": (["--no-refit"], {}),
    "streamed": (["--streaming"], {}),
}


def run_case(model: str, options: list[str], env: dict, args, out_dir: Path) -> dict:
    command = harness.slicegpt_command(
        "slice", model, "--sparsity", str(args.sparsity), "--cal-data", str(harness.CAL_DATA),
        "--cal-samples", str(args.cal_samples), "--cal-seqlen", str(harness.CAL_SEQLEN), "--eval-ppl",
        "--ppl-data", str(harness.WIKITEXT_TEST), "--ppl-chunks", str(args.ppl_chunks), "--threads", str(args.threads),
        "--out", str(out_dir), "--overwrite", *options)
    run = harness.run_watched(command, env={**os.environ, **env})
    if run.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{run.stderr[-3000:]}")
    return {"command": " ".join(["slicegpt", *command[3:]]), "env": env, "peak_rss_bytes": run.peak_rss_bytes,
            "wall_s": round(run.wall_s, 1), "minor_faults": run.usage.ru_minflt,
            "system_s": round(run.usage.ru_stime, 1), "rss_samples": run.rss_samples}


def model_bytes(model: str) -> int:
    from slicegpt.io.models import load_model

    loaded, _ = load_model(model)
    return sum(p.numel() * p.element_size() for p in loaded.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=harness.MODEL)
    parser.add_argument("--cases", default="default", help=f"comma-separated, of: {', '.join(CASES)}")
    parser.add_argument("--sparsity", type=float, default=0.25)
    parser.add_argument("--cal-samples", type=int, default=harness.CAL_SAMPLES)
    parser.add_argument("--ppl-chunks", type=int, default=harness.PPL_CHUNKS)
    parser.add_argument("--threads", type=int, default=harness.THREADS)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    out = harness.RESULTS / (f"memory_{args.tag}.json" if args.tag else "memory.json")
    data = json.loads(out.read_text()) if out.is_file() else {"cases": {}}
    data["model"], data["model_bytes"] = args.model, model_bytes(args.model)
    for name in args.cases.split(","):
        options, env = CASES[name]
        print(f"running {name} ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="slicegpt-memory-") as scratch:
            case = run_case(args.model, options, env, args, Path(scratch) / "out")
        case.update(cal_samples=args.cal_samples, ppl_chunks=args.ppl_chunks, threads=args.threads)
        case["times_model_bytes"] = round(case["peak_rss_bytes"] / data["model_bytes"], 2)
        data["cases"][name] = case
        harness.write_json(out, data, indent=1)
    print(f"model {data['model']}: {data['model_bytes'] / 2**30:.2f} GiB of weights")
    print(f"{'case':>10} {'peak RSS GiB':>12} {'x model':>8} {'wall s':>7} {'minor faults':>12} {'sys s':>6}")
    for name, case in data["cases"].items():
        print(f"{name:>10} {case['peak_rss_bytes'] / 2**30:>12.2f} {case['times_model_bytes']:>8.2f} "
              f"{case['wall_s']:>7.1f} {case['minor_faults']:>12,} {case['system_s']:>6.1f}")
    print(f"wrote {harness.shown(out)}")


if __name__ == "__main__":
    main()
