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
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAL_DATA = ROOT.parent / "shared" / "data" / "wikitext-2" / "wikitext-2-v1.validation.jsonl"
PPL_DATA = ROOT.parent / "shared" / "data" / "wikitext-2" / "wikitext-2-raw-v1.test.jsonl"
# name -> (extra slice options, extra environment)
CASES = {
    "default": ([], {}),
    "no-refit": (["--no-refit"], {}),
    "streamed": (["--streaming"], {}),
}


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_case(model: str, options: list[str], env: dict, args, out_dir: Path) -> dict:
    command = [sys.executable, "-m", "slicegpt.cli", "slice", model, "--sparsity", str(args.sparsity),
               "--cal-data", str(CAL_DATA), "--cal-samples", str(args.cal_samples), "--cal-seqlen", "2048",
               "--eval-ppl", "--ppl-data", str(PPL_DATA), "--ppl-chunks", str(args.ppl_chunks),
               "--threads", str(args.threads), "--out", str(out_dir), "--overwrite", *options]
    start = time.perf_counter()
    child = subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            samples.append((round(time.perf_counter() - start, 1), rss_bytes(child.pid)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    done.set()
    sampler.join()
    if status != 0:
        sys.exit(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
    return {"command": " ".join(["slicegpt", *command[3:]]), "env": env, "peak_rss_bytes": usage.ru_maxrss * 1024,
            "wall_s": round(time.perf_counter() - start, 1), "minor_faults": usage.ru_minflt,
            "system_s": round(usage.ru_stime, 1), "rss_samples": samples}


def model_bytes(model: str) -> int:
    from slicegpt.io.models import load_model

    loaded, _ = load_model(model)
    return sum(p.numel() * p.element_size() for p in loaded.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cases", default="default", help=f"comma-separated, of: {', '.join(CASES)}")
    parser.add_argument("--sparsity", type=float, default=0.25)
    parser.add_argument("--cal-samples", type=int, default=64)
    parser.add_argument("--ppl-chunks", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    out = ROOT / "bench" / "results" / (f"memory_{args.tag}.json" if args.tag else "memory.json")
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
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"model {data['model']}: {data['model_bytes'] / 2**30:.2f} GiB of weights")
    print(f"{'case':>10} {'peak RSS GiB':>12} {'x model':>8} {'wall s':>7} {'minor faults':>12} {'sys s':>6}")
    for name, case in data["cases"].items():
        print(f"{name:>10} {case['peak_rss_bytes'] / 2**30:>12.2f} {case['times_model_bytes']:>8.2f} "
              f"{case['wall_s']:>7.1f} {case['minor_faults']:>12,} {case['system_s']:>6.1f}")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
