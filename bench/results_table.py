"""The README's results table, generated from the JSON in bench/results (never typed by hand).

    python bench/results_table.py            # rewrite the blocks (and the plot)
    python bench/results_table.py --check    # exit 1 if a block differs from the JSON

README.md's block sits between `<!-- results:start -->` and `<!-- results:end -->`;
bench/README.md's per-task zero-shot table between `<!-- zeroshot:start -->` and
`<!-- zeroshot:end -->`. A figure that no finished run recorded shows as "not measured".
Each figure names its source file, the command that wrote it and the commit that recorded
it (zero-shot rows carry their own commit and date).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import harness
import zeroshot

RESULTS = harness.RESULTS
README = harness.ROOT / "README.md"
BENCH_README = harness.ROOT / "bench" / "README.md"
PLOT = RESULTS / "zeroshot_vs_params.png"
START, END = "<!-- results:start -->", "<!-- results:end -->"
ZS_START, ZS_END = "<!-- zeroshot:start -->", "<!-- zeroshot:end -->"
NOT_MEASURED = "not measured"

# Recorded runs the table reads: file -> (command, commit that recorded it, date).
SOURCES = {
    "protocol_p.json": ("python bench/protocol_p.py", "ce447a9", "2026-11-28"),
    "protocol_p_auto.json": ("python bench/protocol_p.py --sparsities 0.25", "6341f84", "2026-11-28"),
    "size_quality_p_c.json": ("python bench/size_quality.py --variants ...", "7d4cecc", "2026-11-28"),
    "protocol_p_default_refit.json": ("python bench/protocol_p.py --threads 2 --tag default_refit", "aa636ff (0.30: 3ad5517)", "2026-12-01"),
    "protocol_p_layouts.json": ("python bench/layouts.py", "919012f", "2026-12-05"),
    "speed_auto.json": ("python bench/speed.py --sparsities 0.25 --variants block --no-ablation", "c0cfd31",
                        "2026-11-28"),
}
# The models of bench/zeroshot.py, with where each one's perplexity and speed were measured.
MODELS = [
    ("dense", "SmolLM2-135M, dense",
     ("protocol_p_auto.json", "dense"), ("speed_auto.json", "dense")),
    ("refit-25", "**`--sparsity 0.25`** (default: one basis, normalized PCA, refit)",
     ("protocol_p_default_refit.json", 0.25), None),
    ("default-25", "`--sparsity 0.25 --no-refit` (the default before the refit)",
     ("size_quality_p_c.json", "model-b25-normalized"), ("speed_auto.json", "25%")),
    ("paper-25", "`--sparsity 0.25 --rotations block --pca raw` (the paper's method)",
     ("protocol_p.json", 0.25), ("speed_auto.json", "25% block")),
    ("default-25+rft", "`--sparsity 0.25 --no-refit`, then `finetune`", ("rft.jsonl", "default-25+rft"), None),
    ("dense+rft", "dense, then the same fine-tuning", ("rft.jsonl", "dense+rft"), None),
    ("refit-20", "`--sparsity 0.20` (default: one basis, refit)", ("protocol_p_default_refit.json", 0.2), None),
    ("default-20", "`--sparsity 0.20 --no-refit`", None, None),
    ("refit-30", "`--sparsity 0.30` (default: one basis, refit over every sequence)",
     ("protocol_p_layouts.json", (0.3, "rotations=model,refit=true,refit_share=1.0,target_params=103148800")), None),
    ("default-30", "`--sparsity 0.30 --rotations block` (the default before: per-block bases, no refit)",
     ("protocol_p_default_refit.json", 0.3), None),
]

# bench/distill.py's recipes shown in the table, once distill.jsonl has their rows.
DISTILLED = [
    ("a-lm-wikitext", "`--sparsity 0.25`, then `finetune` (LM loss, WikiText-2 validation)"),
    ("b-kl-wikitext", "`--sparsity 0.25`, then `finetune --distill` (WikiText-2 validation)"),
    ("c-kl-teacher", "`--sparsity 0.25`, then `finetune --distill --data teacher`"),
    ("best-full", "the best of the three, `--full`"),
    ("slice-teacher-cal", "`--sparsity 0.25 --cal-data teacher`"),
]


def load(name: str, results: Path) -> dict | None:
    path = results / name
    return json.loads(path.read_text()) if path.is_file() else None


def rft_rows(results: Path) -> dict[str, dict]:
    """bench/rft.py's rows by variant (the last of each), from results/rft.jsonl."""
    return {row["variant"]: row for row in harness.read_rows(results / "rft.jsonl")}


def distill_rows(results: Path) -> dict[str, dict[str, dict]]:
    """bench/distill.py's rows (not --quick): the last of each (recipe, evaluation)."""
    rows: dict[str, dict[str, dict]] = {}
    for row in harness.read_rows(results / "distill.jsonl"):
        if not row.get("quick"):
            rows.setdefault(row["recipe"], {})[row["eval"]] = row
    return rows


def distilled_accuracy(recipe: dict, dense: dict, tasks: list[str], chance: dict, metric) -> str:
    """The zero-shot cell of a bench/distill.py recipe, against its own run's dense rows."""
    def above(rows: dict) -> tuple[float, float] | None:
        cells = [rows.get(f"zeroshot:{t}") for t in tasks]
        if not all(cells):
            return None
        values = [c["metrics"][metric(t)] for c, t in zip(cells, tasks)]
        return sum(values) / len(values), sum(v - chance[t] for v, t in zip(values, tasks)) / len(values)

    mine, reference = above(recipe), above(dense)
    if mine is None:
        return NOT_MEASURED
    retention = f"; {100 * mine[1] / reference[1]:.0f}%" if reference and reference[1] else ""
    return f"{100 * mine[0]:.2f} ({100 * mine[1]:.2f}{retention})"


def perplexity(source, results: Path) -> tuple[float, int] | None:
    """(WikiText-2 test perplexity, real parameters) from a protocol P file or rft.jsonl, or None."""
    if source is None:
        return None
    name, key = source
    if name == "rft.jsonl":
        row = rft_rows(results).get(key)
        return (row["ppl_wikitext2_test"], row["params"]) if row else None
    data = load(name, results)
    if data is None:
        return None
    if name.startswith("protocol_p"):
        for row in data["rows"]:
            if key == "dense":
                return row["ppl_dense"], row["params_dense"]
            if row["sparsity"] == key or (isinstance(key, tuple) and (row["sparsity"], row["variant"]) == key):
                return row["ppl_sliced"], row["params_sliced"]
        return None
    for row in data["rows"]:
        if row["key"] == key:
            return row["ppl"], row["params"]
    return None


def decode_speed(source, results: Path) -> tuple[float, float] | None:
    """(batch-1 decode tokens/s, ratio to dense) from a speed file, or None."""
    if source is None:
        return None
    name, key = source
    data = load(name, results)
    if data is None:
        return None
    dense = next(m for m in data["models"] if m["name"] == "dense")["decode_tok_s"]["1"]
    if key == "dense":
        return dense, 1.0
    ratio = data.get("vs_first", {}).get(key, {}).get("decode", {}).get("1")
    return (dense * ratio, ratio) if ratio else None


def zeroshot_summary(results: Path) -> tuple[dict, dict]:
    """bench/zeroshot.py's summary of results/zeroshot.jsonl at its largest limit, and that run's facts."""
    rows = harness.read_rows(results / "zeroshot.jsonl")
    if not rows:
        return {}, {}
    limit = max((r["limit"] or 10**9) for r in rows)
    limit = None if limit == 10**9 else limit
    rows = [r for r in rows if r["limit"] == limit]
    facts = {"limit": limit, "tasks": zeroshot.TASKS, "commits": sorted({r.get("commit", "?") for r in rows}),
             "dates": sorted({r["finished"][:10] for r in rows if r.get("finished")})}
    return zeroshot.summarize(rows, zeroshot.TASKS, limit), facts


def table(results: Path = RESULTS) -> str:
    summary, facts = zeroshot_summary(results)
    lines = ["| model | real parameters | WikiText-2 perplexity | zero-shot average (above chance; retention) "
             "| decode, batch 1 |", "|---|---|---|---|---|"]
    for key, label, ppl_source, speed_source in MODELS:
        ppl = perplexity(ppl_source, results)
        speed = decode_speed(speed_source, results)
        entry = summary.get(key)
        params = ppl[1] if ppl else (entry["params"] if entry else None)
        if entry and entry.get("complete"):
            retention = f"; {100 * entry['retention']:.0f}%" if "retention" in entry else ""
            accuracy = f"{100 * entry['average']:.2f} ({100 * entry['above_chance']:.2f}{retention})"
        elif entry:
            accuracy = f"{NOT_MEASURED} ({len(entry['tasks'])} of {len(facts['tasks'])} tasks so far)"
        else:
            accuracy = NOT_MEASURED
        lines.append(" | ".join([
            f"| {label}",
            f"{params / 1e6:.2f}M" if params else NOT_MEASURED,
            f"{ppl[0]:.2f}" if ppl else NOT_MEASURED,
            accuracy,
            (f"{speed[0]:.1f} tok/s ({speed[1]:.2f} ×)" if speed else NOT_MEASURED) + " |",
        ]))
    distilled = distill_rows(results)
    if distilled:
        for key, label in DISTILLED:
            recipe = distilled.get(key)
            if not recipe:
                continue
            ppl = recipe.get("wikitext2")
            params = next(iter(recipe.values()))["params"]
            source = (recipe.get("train") or {}).get("spec", {}).get("recipe", {}).get("from")
            lines.append(" | ".join([
                f"| {label}" + (f" ({source})" if source else ""),
                f"{params / 1e6:.2f}M",
                f"{ppl['ppl']:.2f}" if ppl else NOT_MEASURED,
                distilled_accuracy(recipe, distilled.get("dense", {}), zeroshot.TASKS, zeroshot.CHANCE,
                                   zeroshot.paper_metric),
                NOT_MEASURED + " |",
            ]))
    notes = ["", "Generated by `python bench/results_table.py` from `bench/results/`:",
             "- real parameters: every parameter counted; perplexity: protocol P (64 × 2048 calibration tokens of "
             "WikiText-2 validation, the first 16 chunks of 2048 tokens of WikiText-2 test, seed 42)."]
    for name, (command, commit, date) in SOURCES.items():
        if (results / name).is_file():
            notes.append(f"- `{name}`: `{command}`, {date}, commit {commit}.")
    rft = [row for key, row in rft_rows(results).items() if key.endswith("+rft")]
    if rft:
        notes.append(f"- fine-tuned rows' perplexity: `python bench/rft.py` → `rft.jsonl` (same protocol P "
                     f"chunks), {', '.join(sorted({r['finished'][:10] for r in rft}))}, commits "
                     f"{', '.join(sorted({r['commit'] for r in rft}))}.")
    if facts:
        limit = f"the first {facts['limit']}" if facts["limit"] else "all"
        notes.append(f"- zero-shot: `python bench/zeroshot.py` → `zeroshot.jsonl`, lm-eval 0.4.13, 0-shot, {limit} "
                     f"examples of each of {', '.join(facts['tasks'])}; the paper's metric (acc_norm; acc for "
                     f"WinoGrande and LAMBADA) averaged; above chance: minus 50% (PIQA, WinoGrande), 25% (ARC, "
                     f"HellaSwag), 0 (LAMBADA); retention: above chance over dense's; runs of "
                     f"{', '.join(facts['dates'])}, commits {', '.join(facts['commits'])}.")
    else:
        notes.append("- zero-shot: no row of `python bench/zeroshot.py` has finished yet.")
    if distilled:
        rows = [row for recipe in distilled.values() for row in recipe.values()]
        notes.append(f"- recovery rows from `--sparsity 0.25` (refit): `python bench/distill.py` → `distill.jsonl`, "
                     f"one token budget, zero-shot retention against that run's dense rows; "
                     f"{', '.join(sorted({r['finished'][:10] for r in rows}))}, commits "
                     f"{', '.join(sorted({r['commit'] for r in rows}))}.")
    notes.append("- decode: CPU, 2 threads, float32, prompt 128 tokens, 32 new tokens with a KV cache, median "
                 "of 5 repeats; the ratio is to dense in the same run.")
    return "\n".join(lines + notes)


def zeroshot_table(results: Path = RESULTS) -> str:
    """Per model and task: the paper's metric ± stderr (%), with the average, above chance and retention."""
    summary, facts = zeroshot_summary(results)
    if not summary:
        return "No row of `python bench/zeroshot.py` has finished yet."
    tasks = facts["tasks"]
    lines = ["| model | params | " + " | ".join(tasks) + " | average | above chance | retention |",
             "|---" * (len(tasks) + 5) + "|"]
    for name, entry in summary.items():
        cells = [f"{100 * c['value']:.1f} ± {100 * (c['stderr'] or 0):.1f}" if (c := entry["tasks"].get(t)) else "–"
                 for t in tasks]
        tail = [f"{100 * entry[k]:.2f}" if k in entry else "–" for k in ("average", "above_chance")]
        tail.append(f"{100 * entry['retention']:.0f}%" if "retention" in entry else "–")
        lines.append(f"| {name} | {entry['params'] / 1e6:.2f}M | " + " | ".join(cells + tail) + " |")
    limit = f"the first {facts['limit']}" if facts["limit"] else "all"
    lines += ["", f"Generated by `python bench/results_table.py` from `results/zeroshot.jsonl`: {limit} examples "
              f"per task; runs of {', '.join(facts['dates'])}, commits {', '.join(facts['commits'])}. "
              "The average, above chance and retention need all six tasks; \"–\" is not measured."]
    return "\n".join(lines)


def plot(results: Path = RESULTS, out: Path = PLOT) -> Path | None:
    """Zero-shot average against real parameters for the models with every task measured."""
    summary, facts = zeroshot_summary(results)
    points = {k: v for k, v in summary.items() if v.get("complete")}
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, entry in points.items():
        marker = "*" if name == "dense" else ("s" if name == "paper-25" else "o")
        ax.scatter(entry["params"] / 1e6, 100 * entry["average"], marker=marker, s=80 if marker == "*" else 40)
        ax.annotate(name, (entry["params"] / 1e6, 100 * entry["average"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.set_xlabel("real parameters (M)")
    ax.set_ylabel("zero-shot average (%)")
    ax.set_title(f"SmolLM2-135M, {len(facts['tasks'])} tasks, first {facts['limit']} examples each", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def replace_block(text: str, block: str, start: str = START, end: str = END) -> str:
    if start not in text or end not in text:
        raise SystemExit(f"no {start} ... {end} block")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{block}\n{end}{tail}"


def generated() -> dict[Path, str]:
    """Each generated file's wanted text."""
    return {README: replace_block(README.read_text(), table()),
            BENCH_README: replace_block(BENCH_README.read_text(), zeroshot_table(), ZS_START, ZS_END)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when README.md differs")
    args = parser.parse_args()
    wanted = generated()
    if args.check:
        sys.exit(0 if all(path.read_text() == text for path, text in wanted.items()) else 1)
    for path, text in wanted.items():
        path.write_text(text)
    made = plot()
    print(table())
    print()
    print(zeroshot_table())
    if made:
        print(f"\nwrote {made}")


if __name__ == "__main__":
    main()
