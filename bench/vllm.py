"""SmolLM2-135M in vLLM: dense, a plain export of a one-basis slice, and a slice with a basis
per block served through slicegpt's vLLM plugin.

For each model:
- greedy tokens: vLLM's against transformers' (float32 both) on a few prompts;
- offline throughput: `LLM.generate` on 64 requests at once (prompts of 128 tokens from
  WikiText-2 test, 128 new tokens each) and on one request, new tokens per second (prefill
  included), and the ratio to dense in the same run: every model stays loaded in a process
  of its own and the models are timed in turns, round after round, so the ratio of a round
  compares models under the same load; the medians over rounds are reported.

The models: the dense model; `--sparsity 0.25 --rotations model --round-to 72` (one basis for
the whole model, 432 wide: a width the 9 heads divide, as transformers' Llama config
requires), exported with `slicegpt export --format plain` (a LlamaForCausalLM that vLLM runs
as it is), and the same sliced directory served through the plugin (same weights: the
plugin against vLLM's own Llama); and `--sparsity 0.25 --rotations block --round-to 72`
(432 wide with two shortcut matrices per layer: the plugin only). Slices need little
calibration for a speed measurement (8 x 512 tokens by default); they are kept in the
scratch directory, so a second run reuses them.

transformers runs here (the project's Python); vLLM runs in another Python
(`--vllm-python`, made by bench/vllm_env.sh) through bench/vllm_measure.py, one model per
process (1 GiB of KV cache each unless VLLM_CPU_KVCACHE_SPACE says otherwise).

    python bench/vllm.py --vllm-python /work/vllm-venv/bin/python
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
CAL_DATA = DATA / "wikitext-2-v1.validation.jsonl"
TEST_DATA = DATA / "wikitext-2-raw-v1.test.jsonl"
GREEDY_PROMPTS = ["The capital of France is", "In 1905, Albert Einstein published",
                  "The recipe calls for two cups of flour and", "def fibonacci(n):"]
SLICES = {"model72": ["--rotations", "model", "--round-to", "72"], "block72": ["--rotations", "block", "--round-to", "72"]}


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "slicegpt.cli", *args], check=True)


def make_models(scratch: Path, cal: list[str]) -> dict[str, Path]:
    """name -> directory: dense, the plain export, the one-basis and per-block sliced directories."""
    from slicegpt.io.models import resolve

    dirs = {"dense": Path(resolve("smollm2-135m"))}
    for name, layout in SLICES.items():
        out = scratch / f"smollm2-135m-25-{name}"
        if not (out / "config.json").is_file():
            print(f"slicing {name} ...", file=sys.stderr, flush=True)
            cli("slice", "smollm2-135m", "--sparsity", "0.25", *layout, "--cal-data",
                str(CAL_DATA), *cal, "--out", str(out), "--overwrite")
        dirs[f"sliced-{name}"] = out
    plain = scratch / "smollm2-135m-25-model72-plain"
    if not (plain / "config.json").is_file():
        cli("export", str(dirs["sliced-model72"]), "--format", "plain", "--out", str(plain), "--overwrite")
    return {"dense": dirs["dense"], "plain 25% (one basis)": plain,
            "plugin 25% (one basis)": dirs["sliced-model72"], "plugin 25% (per block)": dirs["sliced-block72"]}


def describe(directory: Path) -> dict:
    config = json.loads((directory / "config.json").read_text())
    slicing = config.get("slicing")
    params = sum_params(directory)
    if slicing is None:
        return {"architecture": config["architectures"][0], "width": config["hidden_size"], "parameters": params}
    widths = sorted({w for layer in slicing["layers"] for w in (layer["in"], layer.get("mid", layer["in"]))})
    shortcuts = sum(2 - len(layer.get("no_shortcut", [])) for layer in slicing["layers"])
    return {"architecture": config["architectures"][0], "width": widths[0] if len(widths) == 1 else widths,
            "shortcuts": shortcuts, "parameters": params}


def sum_params(directory: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in directory.glob("*.safetensors"):
        with safe_open(path, "pt") as handle:
            total += sum(_numel(handle.get_slice(key).get_shape()) for key in handle.keys())
    return total


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def throughput_prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    """`count` windows of `length` tokens, one after another, from WikiText-2 test."""
    text = "".join(json.loads(line)["text"] for line in TEST_DATA.open())
    ids = tokenizer(text[: 400 * count * length // 64], add_special_tokens=False)["input_ids"]
    if len(ids) < count * length:
        raise SystemExit("not enough WikiText-2 test text for the throughput prompts")
    return [ids[i * length: (i + 1) * length] for i in range(count)]


def transformers_greedy(directory: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    import torch
    from slicegpt.io.models import load_model

    model, _ = load_model(str(directory), dtype="float32")
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                       min_new_tokens=new_tokens, do_sample=False,
                                       pad_token_id=model.config.eos_token_id)
            out.append(generated[0, len(prompt):].tolist())
    return out


class Engine:
    """A bench/vllm_measure.py process holding one model in vLLM, asked for timed generates."""

    def __init__(self, vllm_python: str, job: dict, scratch: Path, name: str):
        slug = "".join(c if c.isalnum() else "-" for c in name)
        job_file = scratch / f"vllm_job_{slug}.json"
        job_file.write_text(json.dumps(job))
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
        self.log = scratch / f"vllm_{slug}.log"
        self.process = subprocess.Popen([vllm_python, str(ROOT / "bench" / "vllm_measure.py"), str(job_file)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.log.open("w"), text=True, env=env)
        self.ready = self.read("ready")

    def read(self, tag: str) -> dict:
        for line in self.process.stdout:
            if line.startswith(f"{tag}: "):
                return json.loads(line[len(tag) + 2:])
        raise SystemExit(f"vLLM stopped (exit {self.process.wait()}); see {self.log}")

    def ask(self, what: str) -> dict:
        self.process.stdin.write(what + "\n")
        self.process.stdin.flush()
        return self.read("result")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write("quit\n")
            self.process.stdin.flush()
            self.process.wait(timeout=120)


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vllm-python", required=True, help="a Python with vLLM and slicegpt (bench/vllm_env.sh)")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/slicegpt-vllm"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "vllm.json")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--greedy-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="timed generates per model and setting, in turns")
    parser.add_argument("--cal-samples", default="8")
    parser.add_argument("--cal-seqlen", default="512")
    parser.add_argument("--eager", action="store_true",
                        help="vLLM without torch.compile or graph capture (starts in seconds rather than minutes)")
    parser.add_argument("--only", nargs="*", help="measure only these models (names as in the JSON)")
    args = parser.parse_args()
    args.scratch.mkdir(parents=True, exist_ok=True)

    from transformers import AutoTokenizer

    models = make_models(args.scratch, ["--cal-samples", args.cal_samples, "--cal-seqlen", args.cal_seqlen])
    models = {name: d for name, d in models.items() if not args.only or name in args.only or name == "dense"}
    tokenizer = AutoTokenizer.from_pretrained(models["dense"])
    greedy_prompts = [tokenizer(p)["input_ids"] for p in GREEDY_PROMPTS]
    job = {"greedy_prompts": greedy_prompts, "greedy_tokens": args.greedy_tokens, "new_tokens": args.new_tokens,
           "throughput_prompts": throughput_prompts(tokenizer, args.requests, args.prompt_tokens),
           "batch": args.requests, "dtype": "float32", "max_model_len": args.prompt_tokens + args.new_tokens,
           "enforce_eager": args.eager}
    data = {"command": "python bench/vllm.py " + " ".join(sys.argv[1:]),
            "date": datetime.date.today().isoformat(),
            "commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True).stdout.strip(),
            "setting": {k: v for k, v in job.items() if k not in ("greedy_prompts", "throughput_prompts")},
            "greedy_prompts": GREEDY_PROMPTS, "load_average_before": [round(x, 2) for x in os.getloadavg()],
            "note": "2 CPU cores shared with other work: models are timed in turns, one round after another, and "
                    "each ratio to dense is the median over rounds of that round's ratio", "models": {}}

    expected = {}
    for name, directory in models.items():
        print(f"transformers: {name}", file=sys.stderr, flush=True)
        expected[name] = transformers_greedy(directory, greedy_prompts, args.greedy_tokens)
    engines = {}
    try:
        for name, directory in models.items():
            print(f"vLLM: loading {name}", file=sys.stderr, flush=True)
            engines[name] = Engine(args.vllm_python, {**job, "model": str(directory)}, args.scratch, name)
            ready = engines[name].ready
            entry = {"directory": str(directory), **describe(directory), "load_s": ready["load_s"],
                     "vllm_version": ready["vllm_version"], "greedy_equal_transformers": ready["greedy"] == expected[name],
                     "batch": {"runs": []}, "single": {"runs": []}}
            if not entry["greedy_equal_transformers"]:
                entry["greedy_vllm"], entry["greedy_transformers"] = ready["greedy"], expected[name]
            data["models"][name] = entry
        for round_index in range(args.rounds):
            for setting in ("batch", "single"):
                for name, engine in engines.items():
                    run = engine.ask(setting)
                    run["load_average_1min"] = round(os.getloadavg()[0], 2)
                    data["models"][name][setting]["runs"].append(run)
                    print(f"round {round_index + 1} {setting} {name}: {run['tokens_per_s']} tok/s", file=sys.stderr,
                          flush=True)
    finally:
        for engine in engines.values():
            engine.close()

    dense = data["models"]["dense"]
    for entry in data["models"].values():
        for setting in ("batch", "single"):
            runs = entry[setting]["runs"]
            entry[setting]["tokens_per_s"] = round(median([r["tokens_per_s"] for r in runs]), 2)
            entry[setting]["vs_dense"] = round(median([r["tokens_per_s"] / d["tokens_per_s"]
                                                       for r, d in zip(runs, dense[setting]["runs"])]), 3)
    data["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(table(data))


def table(data: dict) -> str:
    lines = ["| model | architecture | width | parameters | greedy = transformers | batch tok/s | × dense "
             "| 1 request tok/s | × dense |", "|---|---|---|---|---|---|---|---|---|"]
    for name, e in data["models"].items():
        lines.append(f"| {name} | {e['architecture']} | {e['width']} | {e['parameters'] / 1e6:.1f} M "
                     f"| {'yes' if e['greedy_equal_transformers'] else 'no'} | {e['batch']['tokens_per_s']:.0f} "
                     f"| {e['batch'].get('vs_dense', 1):.3f} | {e['single']['tokens_per_s']:.1f} "
                     f"| {e['single'].get('vs_dense', 1):.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
