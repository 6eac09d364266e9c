"""SmolLM2-135M quantized by llama.cpp, dense and sliced: perplexity against bytes on disk,
without an importance matrix, with llama-imatrix's, and with slicegpt's own.

Models (`--models`): `dense` (the original weights), `dense-rotated` (`slicegpt slice
--sparsity 0`: the same function in the PCA basis, which carries slicegpt's importance),
and the 20% and 25% slices (`--sparsity 0.2` / `0.25`, `--round-to 32`), all calibrated
on protocol P's text (64 x 2048 tokens of WikiText-2 validation). Each is exported to F16
with `slicegpt export --format gguf` (which writes slicegpt's importance matrix beside it),
and quantized by `llama-quantize` to every type in `--types`, once per importance matrix
(`--variants`):
- `none`: no importance matrix;
- `llama`: `llama-imatrix` run on the F16 file over the same calibration windows
  (decoded to text and re-tokenized by llama.cpp, 2048-token chunks);
- `slicegpt`: the importance kept by the slicing run (models sliced by slicegpt only).
A model named with `+rot` (`25%+rot`) is the same slice exported with `--rotate auto`.
Perplexity is `llama-perplexity` on WikiText-2 raw test (`--chunks` chunks of 2048 tokens;
llama.cpp scores the second half of each chunk, so its figures are not the project's
protocol-P perplexities, but every row here is measured the same way). Types whose rows do
not fit their blocks fall back as llama.cpp decides; the count of fallbacks is recorded.
With `--speed`, `llama-bench` measures decode tokens/s (tg 64, 2 threads).

llama.cpp's tools come from bench/llama_cpp_tools.sh (`--tools DIR/bin`); they run with
weight repacking off (`--no-repack`), as the build script explains. Every result is kept
in the scratch directory as it is measured, so an interrupted run resumes; the table is
rewritten into bench/results/llama_cpp_quant.json (and a plot, .png) after each one.

    nice -n 19 python bench/llama_cpp_quant.py --tools ~/.cache/slicegpt/llama-tools/bin \\
        --scratch /path/to/scratch [--models 25% --types Q4_0 --variants none,slicegpt]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
CAL_DATA = DATA / "wikitext-2-v1.validation.jsonl"
TEST_DATA = DATA / "wikitext-2-raw-v1.test.jsonl"
RESULTS = ROOT / "bench" / "results" / "llama_cpp_quant.json"
MODEL = "smollm2-135m"
MODELS = {"dense": None, "dense-rotated": "0", "20%": "0.2", "25%": "0.25"}
# "+rot": the same slice exported with `--rotate auto` (one more rotation inside the kept width).
MODELS.update({f"{name}+rot": sparsity for name, sparsity in list(MODELS.items()) if sparsity is not None})
TYPES = ["F16", "Q8_0", "Q6_K", "Q5_0", "Q4_0", "Q4_K_M", "Q3_K_M", "Q2_K"]
VARIANTS = ["none", "llama", "slicegpt"]


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-8:]
        raise RuntimeError(f"{' '.join(args[:3])} ... failed ({result.returncode}): " + " | ".join(tail))
    return result


def cli(*args: str) -> str:
    return run([sys.executable, "-m", "slicegpt.cli", *args]).stdout


def cached(path: Path, compute):
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return result


class Bench:
    def __init__(self, args):
        self.args = args
        self.scratch = Path(args.scratch)
        self.tools = Path(args.tools)
        self.scratch.mkdir(parents=True, exist_ok=True)

    def tool(self, name: str) -> str:
        path = self.tools / name
        if not path.is_file():
            sys.exit(f"{path} not found: build llama.cpp's tools with bench/llama_cpp_tools.sh")
        return str(path)

    # -- inputs ---------------------------------------------------------------------------------

    def model_dir(self, model: str) -> Path:
        sparsity = MODELS[model]
        if sparsity is None:
            from slicegpt.io.models import resolve

            return Path(resolve(MODEL))
        samples = self.args.cal_samples
        out = Path(self.args.slices) / (f"{MODEL}-s{sparsity}" + (f"-cal{samples}" if samples != 64 else ""))
        if not (out / "config.json").is_file():
            print(f"slicing {model} ...", file=sys.stderr, flush=True)
            cli("slice", MODEL, "--sparsity", sparsity, "--round-to", "32", "--cal-data", str(CAL_DATA),
                "--cal-samples", str(samples), "--cal-seqlen", "2048", "--out", str(out), "--overwrite",
                "--threads", str(self.args.threads))
        return out

    def text_file(self, name: str) -> Path:
        """calN.txt: the slices' N calibration windows (protocol P: 64), decoded; test.txt: WikiText-2 raw
        test joined."""
        path = self.scratch / name
        if path.is_file():
            return path
        from transformers import AutoTokenizer

        from slicegpt.io.data import calibration_batches, load_texts
        from slicegpt.io.models import resolve

        if name.startswith("cal"):
            tokenizer = AutoTokenizer.from_pretrained(resolve(MODEL))
            batches = calibration_batches(tokenizer, load_texts(str(CAL_DATA)), self.args.cal_samples, 2048, 1, 42)
            text = "".join(tokenizer.decode(row) for batch in batches for row in batch["input_ids"])
        else:
            text = "\n\n".join(load_texts(str(TEST_DATA), split="test"))
        path.write_text(text)
        return path

    # -- files ----------------------------------------------------------------------------------

    def f16(self, model: str) -> Path:
        path = self.scratch / f"{model.replace('%', '')}-F16.gguf"
        info = self.scratch / "results" / f"{path.stem}.export.json"

        def export():
            rotate = ["--rotate", "auto"] if model.endswith("+rot") else []
            result = json.loads(cli("export", str(self.model_dir(model)), "--format", "gguf", "--out", str(path),
                                    "--json", "--overwrite", "--tokenizer-pre", "smollm", *rotate))
            return {"hidden_size": result["hidden_size"], "params": result["params"]}

        if not path.is_file():
            info.unlink(missing_ok=True)
        cached(info, export)
        return path

    def imatrix(self, model: str, variant: str) -> Path | None:
        if variant == "none":
            return None
        if variant == "slicegpt":
            path = self.f16(model).with_name(self.f16(model).name.replace(".gguf", ".imatrix.gguf"))
            return path if path.is_file() else None
        path = self.scratch / f"{model.replace('%', '')}.llama-imatrix-cal{self.args.cal_samples}.gguf"
        if not path.is_file():
            print(f"llama-imatrix on {model} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            partial = path.with_name(path.name + ".partial.gguf")
            run([self.tool("llama-imatrix"), "-m", str(self.f16(model)),
                 "-f", str(self.text_file(f"cal{self.args.cal_samples}.txt")), "-o", str(partial), "-c", "2048",
                 "-b", "2048", "--chunks", str(self.args.cal_samples), "-t", str(self.args.threads),
                 "--no-repack", "--no-ppl", "-ofreq", "1000"])
            partial.rename(path)
            (self.scratch / "results" / f"{path.stem}.json").write_text(
                json.dumps({"seconds": round(time.perf_counter() - start, 1)}))
        return path

    def quantized(self, model: str, qtype: str, variant: str) -> tuple[Path, int]:
        f16 = self.f16(model)
        if qtype == "F16":
            return f16, 0
        path = self.scratch / f"{model.replace('%', '')}-{qtype}-{variant}.gguf"
        log = path.with_suffix(".log")
        if not path.is_file():
            imatrix = self.imatrix(model, variant)
            args = [self.tool("llama-quantize")] + (["--imatrix", str(imatrix)] if imatrix else [])
            result = run(args + [str(f16), str(path) + ".partial", qtype, str(self.args.threads)])
            log.write_text(result.stdout + result.stderr)
            os.replace(str(path) + ".partial", path)
        text = log.read_text() if log.is_file() else ""
        return path, text.count("falling back")

    # -- measurements ---------------------------------------------------------------------------

    def perplexity(self, path: Path) -> dict:
        start = time.perf_counter()
        result = run([self.tool("llama-perplexity"), "-m", str(path), "-f", str(self.text_file("test.txt")),
                      "-c", "2048", "-b", "2048", "--chunks", str(self.args.chunks), "-t", str(self.args.threads),
                      "--no-repack"])
        found = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", result.stdout + result.stderr)
        if not found:
            raise RuntimeError(f"no perplexity in llama-perplexity's output for {path}")
        return {"ppl": float(found.group(1)), "ppl_error": float(found.group(2)), "chunks": self.args.chunks,
                "seconds": round(time.perf_counter() - start, 1)}

    def speed(self, path: Path) -> dict:
        result = run([self.tool("llama-bench"), "-m", str(path), "-p", "0", "-n", "64", "-t", str(self.args.threads),
                      "-r", "3", "--repack", "0", "-o", "json"])
        rows = json.loads(result.stdout)
        return {"decode_tokens_per_s": rows[0]["avg_ts"], "load_average": os.getloadavg()[0]}

    def row(self, model: str, qtype: str, variant: str) -> dict | None:
        if variant == "slicegpt" and MODELS[model] is None:
            return None  # the original weights carry no slicing run
        if qtype == "F16" and variant != "none":
            return None
        if variant == "slicegpt" and self.imatrix(model, variant) is None:
            return None
        key = f"{model.replace('%', '')}-{qtype}-{variant}"

        def measure():
            path, fallbacks = self.quantized(model, qtype, variant)
            print(f"perplexity {key} ...", file=sys.stderr, flush=True)
            return {"model": model, "type": qtype, "imatrix": variant, "bytes": path.stat().st_size,
                    "fallback_tensors": fallbacks, **self.perplexity(path)}

        row = cached(self.scratch / "results" / f"{key}.json", measure)
        if self.args.speed and "decode_tokens_per_s" not in row:
            row.update(self.speed(self.quantized(model, qtype, variant)[0]))
            (self.scratch / "results" / f"{key}.json").write_text(json.dumps(row, indent=2))
        return row


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT).stdout.strip()
    except OSError:
        return "unknown"


def write_results(rows: list[dict], args) -> None:
    f16 = {r["model"]: r["ppl"] for r in rows if r["type"] == "F16"}
    for r in rows:
        if r["model"] in f16:
            r["ppl_vs_own_f16"] = round(r["ppl"] / f16[r["model"]], 4)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "command": "python bench/llama_cpp_quant.py " + " ".join(sys.argv[1:]),
        "commit": commit(), "date": time.strftime("%Y-%m-%d"), "model": MODEL, "chunks": args.chunks,
        "slices_cal_samples": args.cal_samples,
        "perplexity": "llama-perplexity, WikiText-2 raw test, 2048-token chunks (second halves scored)",
        "rows": rows}, indent=2) + "\n")
    plot(rows, RESULTS.with_suffix(".png"))


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both bytes and perplexity, by bytes."""
    best, out = float("inf"), []
    for x, y in sorted(points):
        if y < best:
            out.append((x, y))
            best = y
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = {"none": "o", "llama": "s", "slicegpt": "^"}
    colors = {"dense": "black", "dense-rotated": "tab:gray", "20%": "tab:blue", "25%": "tab:red",
              "dense-rotated+rot": "tab:olive", "20%+rot": "tab:cyan", "25%+rot": "tab:orange"}
    for model in MODELS:
        mine = [r for r in rows if r["model"] == model]
        if not mine:
            continue
        for variant, marker in markers.items():
            pts = [(r["bytes"] / 1e6, r["ppl"]) for r in mine if r["imatrix"] == variant]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, color=colors[model], alpha=0.6, s=28)
        line = frontier([(r["bytes"] / 1e6, r["ppl"]) for r in mine])
        ax.plot(*zip(*line), color=colors[model], label=f"{model} frontier", lw=1.5)
    for variant, marker in markers.items():
        ax.scatter([], [], marker=marker, color="gray", label=f"imatrix: {variant}")
    ax.set_xlabel("GGUF file size (MB)")
    ax.set_ylabel("llama-perplexity, WikiText-2 test")
    ax.set_yscale("log")
    ax.set_title(f"{MODEL} in llama.cpp: bytes against perplexity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(rows: list[dict]) -> str:
    """One line per model and type: bytes, and perplexity (x its F16) for each importance matrix."""
    lines = ["| model | type | MB | no imatrix | llama-imatrix | slicegpt |", "|---|---|---:|---:|---:|---:|"]
    cells: dict[tuple[str, str], dict] = {}
    for r in rows:
        cells.setdefault((r["model"], r["type"]), {})[r["imatrix"]] = r
    for (model, qtype), found in cells.items():
        size = next(iter(found.values()))["bytes"] / 1e6
        text = [f"{found[v]['ppl']:.2f} ({found[v].get('ppl_vs_own_f16', 1):.3f}×)" if v in found else ""
                for v in VARIANTS]
        lines.append(f"| {model} | {qtype} | {size:.1f} | " + " | ".join(text) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tools", default=os.environ.get("SLICEGPT_LLAMA_TOOLS", str(Path.home() / ".cache" / "slicegpt"
                                                                                      / "llama-tools")) + "/bin")
    parser.add_argument("--scratch", required=True, help="GGUF files, texts and per-row results (resumable)")
    parser.add_argument("--slices", default=None, help="where the slices are cached (default: the scratch dir)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--chunks", type=int, default=4, help="llama-perplexity chunks of 2048 tokens (default 4)")
    parser.add_argument("--cal-samples", type=int, default=64,
                        help="calibration windows of the slices (default 64, protocol P); fewer on a busy machine")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--speed", action="store_true", help="also llama-bench decode tokens/s")
    parser.add_argument("--table", action="store_true", help="print the results' markdown table and stop")
    args = parser.parse_args()
    if args.table:
        print(markdown_table(json.loads(RESULTS.read_text())["rows"]))
        return
    args.slices = args.slices or args.scratch
    bench = Bench(args)
    previous = json.loads(RESULTS.read_text())["rows"] if RESULTS.is_file() else []
    rows = {(r["model"], r["type"], r["imatrix"]): r for r in previous if r.get("chunks") == args.chunks}
    for model in args.models.split(","):
        for qtype in args.types.split(","):
            for variant in args.variants.split(","):
                row = bench.row(model, qtype, variant)
                if row is None:
                    continue
                rows[(model, qtype, variant)] = row
                print(json.dumps({k: row[k] for k in ("model", "type", "imatrix", "bytes", "ppl")}), flush=True)
                ordered = sorted(rows.values(), key=lambda r: (list(MODELS).index(r["model"]), TYPES.index(r["type"]),
                                                               VARIANTS.index(r["imatrix"])))
                write_results(ordered, args)


if __name__ == "__main__":
    main()
