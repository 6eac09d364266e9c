"""SmolLM2-135M in vLLM: dense, the default slices through slicegpt's vLLM plugin, a plain
export, and a slice with a basis per block.

The models:
- `dense`: the original weights;
- `default 25% (plugin)`: `slicegpt slice --sparsity 0.25`, the directory exactly as it is
  written (one basis, 472 wide, the refit), served through the plugin;
- `plain 25% (432 wide)`: `--sparsity 0.25 --rotations model --round-to 72` exported with
  `slicegpt export --format plain` (a LlamaForCausalLM that vLLM runs as it is; 432 is a
  width the 9 heads divide, as transformers' Llama config requires, which 472 is not);
- `default 30% (plugin)`: `slicegpt slice --sparsity 0.3`, through the plugin;
- `per-block 25% (plugin)`: `--sparsity 0.25 --rotations block` (two shortcut matrices per
  layer), through the plugin.
The slices are calibrated on protocol P's text (64 x 2048 tokens of WikiText-2 validation):
the defaults resolve on the amount of text (the refit needs 16 x 2048 tokens, and without it
the 30% default keeps a basis per block), so fewer windows would measure other layouts.
They are kept in the scratch directory, so a second run reuses them.

For each model:
- greedy tokens: vLLM's against transformers' (float32 both) on a few prompts;
- offline throughput: `LLM.generate` on 64 requests at once (prompts of 128 tokens from
  WikiText-2 test, 128 new tokens each) and on one request, new tokens per second (prefill
  included), and the ratio to dense: every model stays loaded in a process of its own and
  the models are timed in turns, round after round (at least 3), so the ratio of a round
  compares models under the same load; the medians over rounds are reported.
Then `serve`: `vllm serve DIR` on a loopback port for the default 25% slice and the per-block
one (bench/vllm_serve.py): the text of the greedy prompts sent through the `openai` client
(temperature 0, the same max_tokens) against the offline engine's, and requests/s for a burst
of 32 concurrent requests (bounded in count and time); the server is always stopped.

transformers runs here (the project's Python); vLLM runs in another Python
(`--vllm-python`, made by bench/vllm_env.sh) through bench/vllm_measure.py, one model per
process (1 GiB of KV cache each unless VLLM_CPU_KVCACHE_SPACE says otherwise).

    python bench/vllm.py --vllm-python /work/vllm-venv/bin/python --scratch /work/cache-vllm
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import harness

GREEDY_PROMPTS = ["The capital of France is", "In 1905, Albert Einstein published",
                  "The recipe calls for two cups of flour and", "def fibonacci(n):"]
# name -> how `slicegpt slice` makes it (None: the original weights); "plain": exported with --format plain.
MODELS = {
    "dense": None,
    "default 25% (plugin)": {"slice": ["--sparsity", "0.25"]},
    "plain 25% (432 wide)": {"slice": ["--sparsity", "0.25", "--rotations", "model", "--round-to", "72"],
                             "plain": True},
    "default 30% (plugin)": {"slice": ["--sparsity", "0.3"]},
    "per-block 25% (plugin)": {"slice": ["--sparsity", "0.25", "--rotations", "block"]},
}
SERVED = ["default 25% (plugin)", "per-block 25% (plugin)"]
MIN_ROUNDS = 3


def cli(*args: str) -> None:
    subprocess.run(harness.slicegpt_command(*args), check=True)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def make_models(scratch: Path, cal: list[str], names: list[str]) -> dict[str, Path]:
    """name -> directory, slicing (and exporting) what the scratch directory does not hold yet."""
    from slicegpt.io.models import resolve

    dirs = {}
    for name in names:
        recipe = MODELS[name]
        if recipe is None:
            dirs[name] = Path(resolve(harness.MODEL))
            continue
        tag = "-".join(a.lstrip("-") for a in recipe["slice"] + cal)
        sliced = scratch / f"{harness.MODEL}-{tag}"
        if not (sliced / "config.json").is_file():
            print(f"slicing {name} ...", file=sys.stderr, flush=True)
            cli("slice", harness.MODEL, *recipe["slice"], "--cal-data", str(harness.CAL_DATA), *cal, "--out",
                str(sliced), "--overwrite")
        dirs[name] = sliced
        if recipe.get("plain"):
            plain = sliced.with_name(sliced.name + "-plain")
            if not (plain / "config.json").is_file():
                cli("export", str(sliced), "--format", "plain", "--out", str(plain), "--overwrite")
            dirs[name] = plain
    return dirs


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
    text = "".join(json.loads(line)["text"] for line in harness.WIKITEXT_TEST.open())
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
        job_file = scratch / f"vllm_job_{slug(name)}.json"
        job_file.write_text(json.dumps(job))
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
        self.log = scratch / f"vllm_{slug(name)}.log"
        self.process = subprocess.Popen([vllm_python, str(harness.ROOT / "bench" / "vllm_measure.py"), str(job_file)],
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


def summarize(models: dict[str, dict], reference: str = "dense") -> None:
    """Per model and setting: the median tokens/s over rounds, and the median over rounds of that
    round's ratio to the reference model (round i of a model against round i of the reference)."""
    base = models[reference]
    for entry in models.values():
        for setting in ("batch", "single"):
            runs, ref = entry[setting]["runs"], base[setting]["runs"]
            if len(runs) != len(ref):
                raise ValueError(f"{setting}: {len(runs)} rounds against {len(ref)} of {reference}")
            entry[setting]["tokens_per_s"] = round(median([r["tokens_per_s"] for r in runs]), 2)
            entry[setting]["vs_dense"] = round(median([r["tokens_per_s"] / d["tokens_per_s"]
                                                       for r, d in zip(runs, ref)]), 3)


def make_serve_job(name: str, directory: Path, job: dict, offline_texts: list[str], args) -> dict:
    """What bench/vllm_serve.py needs for one model."""
    return {"model": str(directory), "dtype": job["dtype"], "max_model_len": job["max_model_len"],
            "enforce_eager": job["enforce_eager"], "greedy_prompts": job["greedy_prompts"],
            "greedy_tokens": job["greedy_tokens"], "offline_texts": offline_texts,
            "burst": args.serve_burst, "burst_prompts": job["throughput_prompts"][: args.serve_burst],
            "burst_tokens": job["new_tokens"], "ready_timeout_s": args.serve_ready_timeout,
            "burst_timeout_s": args.serve_burst_timeout, "request_timeout_s": args.serve_burst_timeout,
            "log": str(args.scratch / f"vllm_serve_{slug(name)}.log")}


def run_serve(vllm_python: str, job_file: Path, timeout_s: float) -> dict:
    """bench/vllm_serve.py in the vLLM environment; past `timeout_s` it gets SIGTERM (it then stops
    its server) and, a minute later, SIGKILL."""
    process = subprocess.Popen([vllm_python, str(harness.ROOT / "bench" / "vllm_serve.py"), str(job_file)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            out, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        raise RuntimeError(f"bench/vllm_serve.py ran past {timeout_s:.0f} s") from None
    for line in reversed(out.splitlines()):
        if line.startswith("result: "):
            return json.loads(line[len("result: "):])
    raise RuntimeError(f"bench/vllm_serve.py gave no result (exit {process.returncode}): "
                       + " | ".join(err.strip().splitlines()[-5:]))


def serve_entry(run) -> dict:
    """One model's `serve` entry: the result, or the error that stopped it (offline figures stand)."""
    try:
        return run()
    except Exception as error:  # noqa: BLE001 - the error goes into the results
        return {"text_equal_offline": None, "requests_per_s": None, "error": f"{type(error).__name__}: {error}"}


def serve_step(models: dict[str, Path], offline_texts: dict[str, list[str]], job: dict, args,
               runner=run_serve) -> dict[str, dict]:
    serve = {}
    budget = args.serve_ready_timeout + 2 * args.serve_burst_timeout + 120
    for name in SERVED:
        if name not in models:
            continue
        print(f"vllm serve: {name}", file=sys.stderr, flush=True)
        job_file = args.scratch / f"vllm_serve_job_{slug(name)}.json"
        job_file.write_text(json.dumps(make_serve_job(name, models[name], job, offline_texts[name], args)))
        serve[name] = serve_entry(lambda: runner(args.vllm_python, job_file, budget))
    return serve


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vllm-python", required=True, help="a Python with vLLM and slicegpt (bench/vllm_env.sh)")
    p.add_argument("--scratch", type=Path, default=Path("/tmp/slicegpt-vllm"))
    p.add_argument("--out", type=Path, default=harness.RESULTS / "vllm.json")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--greedy-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=MIN_ROUNDS,
                   help=f"timed generates per model and setting, in turns (at least {MIN_ROUNDS})")
    p.add_argument("--cal-samples", default=str(harness.CAL_SAMPLES),
                   help="the slices' calibration windows (default 64, protocol P)")
    p.add_argument("--cal-seqlen", default=str(harness.CAL_SEQLEN))
    p.add_argument("--eager", action="store_true",
                   help="vLLM without torch.compile or graph capture (starts in seconds rather than minutes)")
    p.add_argument("--only", nargs="*", help="measure only these models (names as in the JSON; dense always)")
    p.add_argument("--no-serve", dest="serve", action="store_false", help="skip the `vllm serve` step")
    p.add_argument("--serve-burst", type=int, default=32, help="concurrent requests of the serve burst (default 32)")
    p.add_argument("--serve-ready-timeout", type=float, default=900.0,
                   help="seconds `vllm serve` may take to answer /health (default 900)")
    p.add_argument("--serve-burst-timeout", type=float, default=300.0,
                   help="seconds the burst (and any one request) may take (default 300)")
    return p


def main() -> None:
    args = parser().parse_args()
    if args.rounds < MIN_ROUNDS:
        raise SystemExit(f"--rounds {args.rounds}: medians need at least {MIN_ROUNDS} rounds")
    unknown = [name for name in args.only or [] if name not in MODELS]
    if unknown:
        raise SystemExit(f"unknown models {unknown}: choose from {list(MODELS)}")
    args.scratch.mkdir(parents=True, exist_ok=True)

    from transformers import AutoTokenizer

    names = [name for name in MODELS if not args.only or name in args.only or name == "dense"]
    cal = ["--cal-samples", args.cal_samples, "--cal-seqlen", args.cal_seqlen]
    models = make_models(args.scratch, cal, names)
    tokenizer = AutoTokenizer.from_pretrained(models["dense"])
    greedy_prompts = [tokenizer(p)["input_ids"] for p in GREEDY_PROMPTS]
    job = {"greedy_prompts": greedy_prompts, "greedy_tokens": args.greedy_tokens, "new_tokens": args.new_tokens,
           "throughput_prompts": throughput_prompts(tokenizer, args.requests, args.prompt_tokens),
           "batch": args.requests, "dtype": "float32", "max_model_len": args.prompt_tokens + args.new_tokens,
           "enforce_eager": args.eager}
    data = {"command": "python bench/vllm.py " + " ".join(sys.argv[1:]),
            "date": datetime.date.today().isoformat(),
            "commit": harness.git_commit(),
            "setting": {**{k: v for k, v in job.items() if k not in ("greedy_prompts", "throughput_prompts")},
                        "rounds": args.rounds, "slices": {n: MODELS[n] for n in names if MODELS[n]},
                        "calibration": [str(harness.CAL_DATA.name), *cal]},
            "greedy_prompts": GREEDY_PROMPTS, "load_average_before": harness.load_average(),
            "note": "models are timed in turns, one round after another, and each ratio to dense is the median "
                    "over rounds of that round's ratio", "models": {}}

    expected = {}
    for name, directory in models.items():
        print(f"transformers: {name}", file=sys.stderr, flush=True)
        expected[name] = transformers_greedy(directory, greedy_prompts, args.greedy_tokens)
    engines, offline_texts = {}, {}
    try:
        for name, directory in models.items():
            print(f"vLLM: loading {name}", file=sys.stderr, flush=True)
            engines[name] = Engine(args.vllm_python, {**job, "model": str(directory)}, args.scratch, name)
            ready = engines[name].ready
            offline_texts[name] = ready["greedy_text"]
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

    summarize(data["models"])
    data["load_average_after"] = harness.load_average()
    harness.write_json(args.out, data)  # the offline figures stand if serving fails
    if args.serve:
        data["serve"] = serve_step(models, offline_texts, job, args)
        data["serve_setting"] = {"burst": args.serve_burst, "burst_new_tokens": args.new_tokens,
                                 "ready_timeout_s": args.serve_ready_timeout,
                                 "burst_timeout_s": args.serve_burst_timeout, "host": "127.0.0.1"}
        harness.write_json(args.out, data)
    print(table(data))


def table(data: dict) -> str:
    lines = ["| model | architecture | width | parameters | greedy = transformers | batch tok/s | × dense "
             "| 1 request tok/s | × dense |", "|---|---|---|---|---|---|---|---|---|"]
    for name, e in data["models"].items():
        lines.append(f"| {name} | {e['architecture']} | {e['width']} | {e['parameters'] / 1e6:.1f} M "
                     f"| {'yes' if e['greedy_equal_transformers'] else 'no'} | {e['batch']['tokens_per_s']:.0f} "
                     f"| {e['batch'].get('vs_dense', 1):.3f} | {e['single']['tokens_per_s']:.1f} "
                     f"| {e['single'].get('vs_dense', 1):.3f} |")
    for name, e in data.get("serve", {}).items():
        rate = "" if e.get("requests_per_s") is None else f"{e['requests_per_s']:.2f} requests/s"
        lines.append(f"\nvllm serve {name}: text = offline {e.get('text_equal_offline')}, {rate}"
                     + (f" ({e['error']})" if "error" in e else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
