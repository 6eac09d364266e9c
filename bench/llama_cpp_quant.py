"""SmolLM2-135M quantized by llama.cpp, dense and sliced: perplexity against bytes on disk,
without an importance matrix, with llama-imatrix's, and with slicegpt's own.

Models (`--models`): `dense` (the original weights, exported as they are: no slicing run),
and the default 25% and 30% slices (`slicegpt slice --sparsity 0.25` / `0.3` with every
default but `--round-for Q4_0`, which rounds a width down to a multiple of 32 where it is
not one already), calibrated on protocol P's text (64 x 2048 tokens of WikiText-2
validation). `dense-rotated` (`--sparsity 0`) and `20%` can be named too. `--extra-model
NAME=DIR` adds a sliced directory made elsewhere (the best recovered 25% slice, say).
Every slice is exported twice: as it is (`rotate: none`) and with `slicegpt export
--rotate auto` (`rotate: auto`, one more rotation inside the kept width). Each export is an
F16 GGUF file (`slicegpt export --format gguf`, which writes the slice's importance matrix
beside it, MODEL.imatrix.gguf, the file `export --quantize` weighs with), quantized by
`llama-quantize` to every type in `--types` (default F16, Q8_0, Q4_0, Q4_K_M, Q3_K_M), once
per importance matrix (`--variants`):
- `none`: no importance matrix;
- `llama`: `llama-imatrix` run on the F16 file over the slices' calibration windows
  (the same 2048-token windows `slicegpt slice` draws, decoded to a text file and
  re-tokenized by llama.cpp);
- `slicegpt`: the importance kept by the slicing run (models sliced by slicegpt only).
A type whose rows do not fit its blocks falls back as llama.cpp decides; the fallbacks
named in llama-quantize's log are recorded with the row (`fallbacks`).

Perplexity is `llama-perplexity` (2048-token chunks; llama.cpp scores the second half of
each, so its figures are not the project's protocol-P perplexities, but every row here is
measured the same way) on two corpora: WikiText-2 raw test (`--wikitext-chunks`, 8; 16 for
the longer run) and the LAMBADA (OpenAI) test passages joined by blank lines
(`--lambada-chunks`, 4). `llama-bench` measures prompt (pp) and decode (tg) tokens/s of the
F16 and Q4_0 files (no importance matrix: it does not change the types, so not the speed).
Every llama.cpp tool runs alone (one process at a time, a lock on the scratch directory
keeps a second run out) with as many threads as the machine has cores (`--threads`).

Rows: one per (model, rotate, type, importance, corpus) and one per llama-bench run; each is
kept in the scratch directory as it is measured, so an interrupted run resumes where it
stopped, and the table is rewritten into bench/results/llama_cpp_quant.json (command, date,
commit, the tools' build time where bench/llama_cpp_tools.sh recorded it) after every row,
and the plot of bytes against perplexity with each model's frontier (.png) at the end.

llama.cpp's tools come from bench/llama_cpp_tools.sh (`--tools DIR/bin`); they run with
weight repacking off (`--no-repack`), as the build script explains.

    nice -n 19 python bench/llama_cpp_quant.py --scratch /path/to/scratch \\
        [--tools ~/.cache/slicegpt/llama-tools/bin] [--extra-model 25%-recovered=/path/to/slice]
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

import harness

CORPORA = harness.CORPORA  # WikiText-2 raw test and the LAMBADA passages
RESULTS = harness.RESULTS / "llama_cpp_quant.json"
MODEL = harness.MODEL
# name -> `slicegpt slice --sparsity` (None: the original weights, no slicing run).
MODELS = {"dense": None, "dense-rotated": "0", "20%": "0.2", "25%": "0.25", "30%": "0.3"}
DEFAULT_MODELS = ["dense", "25%", "30%"]
ROTATES = ["none", "auto"]
TYPES = ["F16", "Q8_0", "Q6_K", "Q5_0", "Q4_0", "Q4_K_M", "Q3_K_M", "Q2_K"]
DEFAULT_TYPES = ["F16", "Q8_0", "Q4_0", "Q4_K_M", "Q3_K_M"]
BENCH_TYPES = ["F16", "Q4_0"]
VARIANTS = ["none", "llama", "slicegpt"]
BENCH = "llama-bench"  # the corpus field of a speed row
CAL_SEQLEN = harness.CAL_SEQLEN
PROTOCOL_P_SAMPLES = harness.CAL_SAMPLES
BUILD_INFO = "build_time.json"  # written by bench/llama_cpp_tools.sh beside bin/


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-8:]
        raise RuntimeError(f"{' '.join(args[:3])} ... failed ({result.returncode}): " + " | ".join(tail))
    return result


def cli(*args: str) -> str:
    return run(harness.slicegpt_command(*args)).stdout


# -- pure pieces ------------------------------------------------------------------------------

def row_key(row: dict) -> tuple[str, str, str, str, str]:
    """(model, rotate, type, importance, corpus); a llama-bench row's corpus is "llama-bench"."""
    return row["model"], row["rotate"], row["type"], row["imatrix"], row["corpus"]


def matrix(models: list[str], sliced: set[str], rotates: list[str], types: list[str], variants: list[str],
           corpora: list[str], speed: bool = True) -> list[dict]:
    """Every row to measure, in the order measured: perplexity per corpus, then llama-bench for
    the F16 and Q4_0 files. `sliced`: the models that come from a slicing run (only those are
    rotated again and carry slicegpt's importance). F16 is measured once, without importance."""
    jobs = []
    for model in models:
        for rotate in rotates:
            if rotate != "none" and model not in sliced:
                continue
            for qtype in types:
                for variant in variants:
                    if (qtype == "F16" and variant != "none") or (variant == "slicegpt" and model not in sliced):
                        continue
                    base = {"model": model, "rotate": rotate, "type": qtype, "imatrix": variant}
                    jobs += [{**base, "corpus": corpus} for corpus in corpora]
                    if speed and qtype in BENCH_TYPES and variant == "none":
                        jobs.append({**base, "corpus": BENCH})
    return jobs


def slug(job: dict, chunks: dict[str, int]) -> str:
    """The file name of a row in the scratch directory (the chunk count is part of the measurement)."""
    corpus = job["corpus"] if job["corpus"] == BENCH else f"{job['corpus']}-c{chunks[job['corpus']]}"
    return "-".join([job["model"].replace("%", ""), f"rot{job['rotate']}", job["type"], job["imatrix"], corpus])


def parse_fallbacks(log: str) -> dict:
    """The tensors llama-quantize stored as another type than asked, from its log:
    "[ 12/ 272] blk.0.ffn_down.weight - [...], type = f16," then "llama_tensor_get_type : tensor
    cols 1536 x 432 are not divisible by 256, required for q4_K - using fallback quantization q5_0"."""
    tensors, current = [], None
    for line in log.splitlines():
        named = re.match(r"\s*\[\s*\d+/\s*\d+\]\s+(\S+)\s+-", line)
        if named:
            current = named.group(1)
        found = re.search(r"required for (\w+)\s*-\s*using fallback quantization (\w+)", line)
        if found:
            tensors.append({"tensor": current, "wanted": found.group(1), "stored_as": found.group(2)})
    by_type: dict[str, int] = {}
    for t in tensors:
        pair = f"{t['wanted']} -> {t['stored_as']}"
        by_type[pair] = by_type.get(pair, 0) + 1
    total = re.search(r"WARNING: (\d+) of (\d+) tensor\(s\) required fallback quantization", log)
    return {"count": len(tensors), "by_type": by_type, "tensors": tensors,
            "of": int(total.group(2)) if total else None}


def parse_perplexity(output: str) -> tuple[float, float]:
    found = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", output)
    if not found:
        raise RuntimeError("no perplexity in llama-perplexity's output")
    return float(found.group(1)), float(found.group(2))


def parse_llama_bench(output: str) -> dict:
    """llama-bench -o json: the prompt (pp) and decode (tg) rows' mean and spread of tokens/s."""
    result = {}
    for row in json.loads(output):
        kind = "tg" if row.get("n_gen", 0) > 0 else "pp"
        tokens = row["n_gen"] if kind == "tg" else row["n_prompt"]
        result.update({f"{kind}_tokens": tokens, f"{kind}_tokens_per_s": row["avg_ts"],
                       f"{kind}_stddev": row.get("stddev_ts")})
    return result


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both bytes and perplexity, by bytes."""
    best, out = float("inf"), []
    for x, y in sorted(points):
        if y < best:
            out.append((x, y))
            best = y
    return out


def series_name(row: dict) -> str:
    return row["model"] + (f" +rot {row['rotate']}" if row["rotate"] != "none" else "")


def frontiers(rows: list[dict], corpus: str) -> dict[str, list[tuple[int, float]]]:
    """Each model's (each export's) frontier of (bytes, perplexity) on one corpus."""
    points: dict[str, list] = {}
    for r in rows:
        if r["corpus"] == corpus:
            points.setdefault(series_name(r), []).append((r["bytes"], r["ppl"]))
    return {name: frontier(found) for name, found in points.items()}


def same_settings(row: dict, settings: dict) -> bool:
    """Whether a row kept from an earlier run was measured as this run measures."""
    if "corpus" not in row or "rotate" not in row or row.get("cal_samples") != settings["cal_samples"]:
        return False
    return row["corpus"] == BENCH or row.get("chunks") == settings["chunks"].get(row["corpus"])


def tools_build(tools: Path) -> dict | None:
    """What bench/llama_cpp_tools.sh recorded about the build (its time), beside bin/ or above."""
    for directory in (tools, tools.parent, tools.parent.parent):
        path = directory / BUILD_INFO
        if path.is_file():
            return json.loads(path.read_text())
    return None


def parse_extra(specs: list[str]) -> dict[str, str]:
    extras = {}
    for spec in specs:
        name, _, directory = spec.partition("=")
        if not name or not directory:
            raise SystemExit(f"--extra-model takes NAME=DIR, not {spec!r}")
        if name in MODELS or name in extras:
            raise SystemExit(f"--extra-model {name}: the name is taken")
        if not (Path(directory) / "config.json").is_file():
            raise SystemExit(f"--extra-model {name}: {directory} holds no config.json")
        extras[name] = directory
    return extras


# -- the measurements -------------------------------------------------------------------------

class Bench:
    """Files in the scratch directory, each made once: slices, F16 exports, importance matrices,
    quantized files, and one JSON file per measured row. `run` and `cli` start the processes
    (llama.cpp's tools, slicegpt's CLI), one at a time."""

    def __init__(self, args, extras: dict[str, str] | None = None, run=run, cli=cli):
        self.args = args
        self.extras = extras or {}
        self.run, self.cli = run, cli
        self.scratch = Path(args.scratch)
        self.tools = Path(args.tools)
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.chunks = {"wikitext2": args.wikitext_chunks, "lambada": args.lambada_chunks}
        self.repack: list[str] | None = None

    def tool(self, name: str) -> str:
        path = self.tools / name
        if not path.is_file():
            sys.exit(f"{path} not found: build llama.cpp's tools with bench/llama_cpp_tools.sh")
        return str(path)

    def sliced(self, model: str) -> bool:
        return model in self.extras or MODELS.get(model) is not None

    def tag(self, model: str, rotate: str) -> str:
        """The stem of a model's files: its name, the slices' calibration where not protocol P's, the rotation."""
        samples = self.args.cal_samples
        cal = f"-cal{samples}" if MODELS.get(model) is not None and samples != PROTOCOL_P_SAMPLES else ""
        return model.replace("%", "") + cal + ("" if rotate == "none" else f"-rot{rotate}")

    # -- inputs ---------------------------------------------------------------------------------

    def model_dir(self, model: str) -> Path:
        if model in self.extras:
            return Path(self.extras[model])
        sparsity = MODELS[model]
        if sparsity is None:
            from slicegpt.io.models import resolve

            return Path(resolve(MODEL))
        samples = self.args.cal_samples
        out = Path(self.args.slices) / (f"{MODEL}-s{sparsity}-q4_0"
                                        + (f"-cal{samples}" if samples != PROTOCOL_P_SAMPLES else ""))
        if not (out / "config.json").is_file():
            print(f"slicing {model} ...", file=sys.stderr, flush=True)
            self.cli("slice", MODEL, "--sparsity", sparsity, "--round-for", "Q4_0", "--cal-data", str(harness.CAL_DATA),
                     "--cal-samples", str(samples), "--cal-seqlen", str(CAL_SEQLEN), "--out", str(out),
                     "--overwrite", "--threads", str(self.args.threads))
        return out

    def text_file(self, name: str) -> Path:
        """calN.txt: the slices' N calibration windows (protocol P: 64), decoded; wikitext2.txt and
        lambada.txt: the corpus's rows joined by blank lines (as slicegpt's perplexity joins them)."""
        path = self.scratch / name
        if path.is_file():
            return path
        from slicegpt.io.data import calibration_batches, load_texts

        if name.startswith("cal"):
            from transformers import AutoTokenizer

            from slicegpt.io.models import resolve

            tokenizer = AutoTokenizer.from_pretrained(resolve(MODEL))
            batches = calibration_batches(tokenizer, load_texts(str(harness.CAL_DATA)), self.args.cal_samples,
                                          CAL_SEQLEN, 1, harness.SEED)
            text = "".join(tokenizer.decode(row) for batch in batches for row in batch["input_ids"])
        else:
            text = "\n\n".join(load_texts(str(CORPORA[path.stem]), split="test"))
        path.write_text(text)
        return path

    # -- files ----------------------------------------------------------------------------------

    def f16(self, model: str, rotate: str) -> Path:
        path = self.scratch / f"{self.tag(model, rotate)}-F16.gguf"
        info = self.scratch / "results" / f"{path.stem}.export.json"
        if not path.is_file():
            info.unlink(missing_ok=True)
            rotation = [] if rotate == "none" else ["--rotate", rotate]
            result = json.loads(self.cli("export", str(self.model_dir(model)), "--format", "gguf", "--out", str(path),
                                         "--json", "--overwrite", "--tokenizer-pre", "smollm", *rotation))
            info.parent.mkdir(parents=True, exist_ok=True)
            info.write_text(json.dumps({k: result.get(k) for k in ("hidden_size", "params", "extra_rotation")}))
        return path

    def imatrix(self, model: str, rotate: str, variant: str) -> Path | None:
        if variant == "none":
            return None
        f16 = self.f16(model, rotate)
        if variant == "slicegpt":
            path = f16.with_name(f16.name[: -len(".gguf")] + ".imatrix.gguf")
            return path if path.is_file() else None
        path = self.scratch / f"{self.tag(model, rotate)}.llama-imatrix-cal{self.args.cal_samples}.gguf"
        if not path.is_file():
            print(f"llama-imatrix on {model} (rotate {rotate}) ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            partial = path.with_name(path.name + ".partial.gguf")
            self.run([self.tool("llama-imatrix"), "-m", str(f16),
                      "-f", str(self.text_file(f"cal{self.args.cal_samples}.txt")), "-o", str(partial),
                      "-c", str(CAL_SEQLEN), "-b", str(CAL_SEQLEN), "--chunks", str(self.args.cal_samples),
                      "-t", str(self.args.threads), "--no-repack", "--no-ppl", "-ofreq", "1000"])
            partial.rename(path)
            (self.scratch / "results").mkdir(exist_ok=True)
            (self.scratch / "results" / f"{path.stem}.json").write_text(
                json.dumps({"seconds": round(time.perf_counter() - start, 1)}))
        return path

    def quantized(self, model: str, rotate: str, qtype: str, variant: str) -> tuple[Path, dict]:
        """The file and what llama-quantize's log says fell back."""
        f16 = self.f16(model, rotate)
        if qtype == "F16":
            return f16, parse_fallbacks("")
        path = self.scratch / f"{self.tag(model, rotate)}-{qtype}-{variant}.gguf"
        log = path.with_suffix(".log")
        if not path.is_file():
            imatrix = self.imatrix(model, rotate, variant)
            args = [self.tool("llama-quantize")] + (["--imatrix", str(imatrix)] if imatrix else [])
            result = self.run(args + [str(f16), str(path) + ".partial", qtype, str(self.args.threads)])
            log.write_text(result.stdout + result.stderr)
            os.replace(str(path) + ".partial", path)
        return path, parse_fallbacks(log.read_text() if log.is_file() else "")

    # -- measurements ---------------------------------------------------------------------------

    def perplexity(self, path: Path, corpus: str) -> dict:
        start = time.perf_counter()
        chunks = self.chunks[corpus]
        result = self.run([self.tool("llama-perplexity"), "-m", str(path), "-f", str(self.text_file(f"{corpus}.txt")),
                           "-c", "2048", "-b", "2048", "--chunks", str(chunks), "-t", str(self.args.threads),
                           "--no-repack"])
        ppl, error = parse_perplexity(result.stdout + result.stderr)
        return {"ppl": ppl, "ppl_error": error, "chunks": chunks, "seconds": round(time.perf_counter() - start, 1)}

    def speed(self, path: Path) -> dict:
        bench = self.tool("llama-bench")
        if self.repack is None:  # repacking is built off; a newer llama-bench also takes --repack 0
            self.repack = ["--repack", "0"] if "--repack" in self.run([bench, "--help"]).stdout else []
        result = self.run([bench, "-m", str(path), "-p", str(self.args.bench_prompt), "-n", str(self.args.bench_gen),
                           "-t", str(self.args.threads), "-r", str(self.args.bench_reps), *self.repack, "-o", "json"])
        return {**parse_llama_bench(result.stdout), "repetitions": self.args.bench_reps,
                "load_average_1min": round(os.getloadavg()[0], 2)}

    def measure(self, job: dict) -> dict | None:
        """The row of `job` (from `matrix`), measured now or read back from the scratch directory;
        None where there is nothing to measure (a slicegpt importance matrix the model lacks)."""
        cache = self.scratch / "results" / f"{slug(job, self.chunks)}.json"
        if cache.is_file():
            return json.loads(cache.read_text())
        model, rotate, qtype, variant = job["model"], job["rotate"], job["type"], job["imatrix"]
        if variant == "slicegpt" and self.imatrix(model, rotate, variant) is None:
            print(f"{model} holds no slicegpt importance: no {variant} rows", file=sys.stderr, flush=True)
            return None
        path, fallbacks = self.quantized(model, rotate, qtype, variant)
        # Counts by type in the row; every tensor's name stays in the quantizer's log beside the file.
        fallbacks = {**{k: v for k, v in fallbacks.items() if k != "tensors"},
                     "first": [t["tensor"] for t in fallbacks["tensors"][:3]]}
        row = {**job, "bytes": path.stat().st_size, "cal_samples": self.args.cal_samples,
               "threads": self.args.threads, "fallbacks": fallbacks}
        print(f"{job['corpus']}: {slug(job, self.chunks)} ...", file=sys.stderr, flush=True)
        row.update(self.speed(path) if job["corpus"] == BENCH else self.perplexity(path, job["corpus"]))
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(row, indent=2))
        return row


# -- output -----------------------------------------------------------------------------------

def order(rows: list[dict], models: list[str]) -> list[dict]:
    corpora = [*CORPORA, BENCH]
    return sorted(rows, key=lambda r: (models.index(r["model"]) if r["model"] in models else len(models),
                                       r["model"], ROTATES.index(r["rotate"]), TYPES.index(r["type"]),
                                       VARIANTS.index(r["imatrix"]), corpora.index(r["corpus"])))


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each perplexity also as a ratio to the same export's F16 on the same corpus."""
    f16 = {(r["model"], r["rotate"], r["corpus"]): r["ppl"] for r in rows if r["type"] == "F16" and "ppl" in r}
    out = []
    for r in rows:
        own = f16.get((r["model"], r["rotate"], r["corpus"]))
        out.append({**r, "ppl_vs_own_f16": round(r["ppl"] / own, 4)} if own and "ppl" in r else dict(r))
    return out


def document(rows: list[dict], settings: dict, build: dict | None, command: str) -> dict:
    ppl_rows = [r for r in rows if r["corpus"] != BENCH]
    return {"command": command, "commit": harness.git_commit(), "date": time.strftime("%Y-%m-%d"), "model": MODEL,
            "settings": settings, "tools_build": build,
            "perplexity": "llama-perplexity, 2048-token chunks (second halves scored): WikiText-2 raw test, LAMBADA "
                          "(OpenAI) test passages joined by blank lines",
            "speed": "llama-bench: pp = prompt tokens/s, tg = decode tokens/s",
            "frontiers": {corpus: {name: [list(p) for p in line] for name, line in frontiers(ppl_rows, corpus).items()}
                          for corpus in CORPORA},
            "rows": rows}


def write_results(rows: list[dict], settings: dict, build: dict | None, path: Path = RESULTS,
                  with_plot: bool = True) -> None:
    command = "python bench/llama_cpp_quant.py " + " ".join(sys.argv[1:])
    harness.write_json(path, document(rows, settings, build, command))
    if with_plot:
        plot(rows, path.with_suffix(".png"))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corpora = [c for c in CORPORA if any(r["corpus"] == c for r in rows)]
    if not corpora:
        return
    fig, axes = plt.subplots(1, len(corpora), figsize=(7.5 * len(corpora), 5.5), squeeze=False)
    markers = {"none": "o", "llama": "s", "slicegpt": "^"}
    names = list(dict.fromkeys(series_name(r) for r in rows))
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(names)}
    for ax, corpus in zip(axes[0], corpora):
        mine = [r for r in rows if r["corpus"] == corpus]
        for r in mine:
            ax.scatter(r["bytes"] / 1e6, r["ppl"], marker=markers[r["imatrix"]], color=colors[series_name(r)],
                       alpha=0.6, s=28)
        for name, line in frontiers(mine, corpus).items():
            ax.plot([x / 1e6 for x, _ in line], [y for _, y in line], color=colors[name], lw=1.5,
                    label=f"{name} frontier")
        for variant, marker in markers.items():
            ax.scatter([], [], marker=marker, color="gray", label=f"imatrix: {variant}")
        ax.set_xlabel("GGUF file size (MB)")
        ax.set_ylabel(f"llama-perplexity, {corpus}")
        ax.set_yscale("log")
        ax.set_title(f"{MODEL} in llama.cpp: {corpus}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(rows: list[dict]) -> str:
    """Per corpus, one line per export and type: bytes, and perplexity (x its F16) for each importance
    matrix; then the llama-bench rows."""
    rows = [r for r in rows if "corpus" in r and "rotate" in r]  # rows of the layout before corpora: left out
    lines = []
    for corpus in CORPORA:
        cells: dict[tuple, dict] = {}
        for r in rows:
            if r["corpus"] == corpus:
                cells.setdefault((series_name(r), r["type"]), {})[r["imatrix"]] = r
        if not cells:
            continue
        lines += ["", f"{corpus}:", "", "| model | type | MB | no imatrix | llama-imatrix | slicegpt | fallbacks |",
                  "|---|---|---:|---:|---:|---:|---|"]
        for (name, qtype), found in cells.items():
            first = next(iter(found.values()))
            text = [f"{found[v]['ppl']:.2f} ({found[v].get('ppl_vs_own_f16', 1):.3f}×)" if v in found else ""
                    for v in VARIANTS]
            falls = ", ".join(f"{n} {pair}" for pair, n in first["fallbacks"]["by_type"].items())
            lines.append(f"| {name} | {qtype} | {first['bytes'] / 1e6:.1f} | " + " | ".join(text) + f" | {falls} |")
    speed = [r for r in rows if r["corpus"] == BENCH]
    if speed:
        lines += ["", "llama-bench:", "", "| model | type | MB | pp tok/s | tg tok/s |", "|---|---|---:|---:|---:|"]
        lines += [f"| {series_name(r)} | {r['type']} | {r['bytes'] / 1e6:.1f} | {r['pp_tokens_per_s']:.1f} "
                  f"| {r['tg_tokens_per_s']:.1f} |" for r in speed]
    return "\n".join(lines).strip()


# -- the run ----------------------------------------------------------------------------------

def hold_lock(scratch: Path):
    """One run per scratch directory, so no two llama.cpp processes run at once."""
    import fcntl

    scratch.mkdir(parents=True, exist_ok=True)
    handle = (scratch / ".lock").open("w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        sys.exit(f"another bench/llama_cpp_quant.py run holds {scratch}")
    return handle


def settings_of(args) -> dict:
    return {"chunks": {"wikitext2": args.wikitext_chunks, "lambada": args.lambada_chunks},
            "cal_samples": args.cal_samples, "cal_seqlen": CAL_SEQLEN, "threads": args.threads,
            "bench": {"prompt": args.bench_prompt, "gen": args.bench_gen, "repetitions": args.bench_reps}}


def measure_all(bench: Bench, jobs: list[dict], previous: list[dict], settings: dict, models: list[str],
                write) -> list[dict]:
    """Measure every job in turn (a finished one is read back), `write` the table after each."""
    rows = {row_key(r): r for r in previous if same_settings(r, settings)}
    for job in jobs:
        row = bench.measure(job)
        if row is None:
            continue
        rows[row_key(row)] = row
        shown = {k: row.get(k) for k in ("model", "rotate", "type", "imatrix", "corpus", "bytes", "ppl",
                                         "tg_tokens_per_s")}
        print(json.dumps(shown), flush=True)
        write(with_ratios(order(list(rows.values()), models)))
    return with_ratios(order(list(rows.values()), models))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tools", default=os.environ.get("SLICEGPT_LLAMA_TOOLS", str(Path.home() / ".cache" / "slicegpt"
                                                                                 / "llama-tools")) + "/bin")
    p.add_argument("--scratch", help="GGUF files, texts and per-row results (resumable); required but with --table")
    p.add_argument("--slices", default=None, help="where the slices are cached (default: the scratch dir)")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="of " + ", ".join(MODELS).replace("%", "%%"))
    p.add_argument("--extra-model", action="append", default=[], metavar="NAME=DIR",
                   help="a sliced directory made elsewhere (e.g. the best recovered 25%% slice); repeatable")
    p.add_argument("--rotates", default=",".join(ROTATES), help="export --rotate values for the slices")
    p.add_argument("--types", default=",".join(DEFAULT_TYPES))
    p.add_argument("--variants", default=",".join(VARIANTS), help="importance matrices: none, llama, slicegpt")
    p.add_argument("--corpora", default=",".join(CORPORA))
    p.add_argument("--wikitext-chunks", "--chunks", type=int, default=8,
                   help="WikiText-2 test chunks of 2048 tokens (default 8; 16 for the longer run)")
    p.add_argument("--lambada-chunks", type=int, default=4, help="LAMBADA chunks of 2048 tokens (default 4)")
    p.add_argument("--cal-samples", type=int, default=PROTOCOL_P_SAMPLES,
                   help="calibration windows of the slices (default 64, protocol P); under 16 the 30%% slice "
                        "keeps a basis per block, which GGUF cannot hold")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of every tool (default: all cores)")
    p.add_argument("--no-speed", dest="speed", action="store_false", help="skip llama-bench")
    p.add_argument("--bench-prompt", type=int, default=512, help="llama-bench prompt tokens (pp, default 512)")
    p.add_argument("--bench-gen", type=int, default=128, help="llama-bench decode tokens (tg, default 128)")
    p.add_argument("--bench-reps", type=int, default=5, help="llama-bench repetitions (default 5)")
    p.add_argument("--table", action="store_true", help="print the results' markdown table and stop")
    return p


def main() -> None:
    args = parser().parse_args()
    if args.table:
        print(markdown_table(json.loads(RESULTS.read_text())["rows"]))
        return
    if not args.scratch:
        raise SystemExit("--scratch DIR is required")
    extras = parse_extra(args.extra_model)
    models = [m for m in args.models.split(",") if m] + list(extras)
    unknown = [m for m in models if m not in MODELS and m not in extras]
    if unknown:
        raise SystemExit(f"unknown models {unknown}: choose from {', '.join(MODELS)} or add --extra-model NAME=DIR")
    args.slices = args.slices or args.scratch
    lock = hold_lock(Path(args.scratch))
    bench = Bench(args, extras)
    settings = settings_of(args)
    jobs = matrix(models, {m for m in models if bench.sliced(m)}, args.rotates.split(","), args.types.split(","),
                  args.variants.split(","), args.corpora.split(","), speed=args.speed)
    previous = json.loads(RESULTS.read_text())["rows"] if RESULTS.is_file() else []
    build = tools_build(Path(args.tools))
    # The JSON after every row (an interrupted run loses nothing); the plot, slower, at the end.
    rows = measure_all(bench, jobs, previous, settings, models,
                       lambda rows: write_results(rows, settings, build, with_plot=False))
    write_results(rows, settings, build)
    lock.close()


if __name__ == "__main__":
    main()
