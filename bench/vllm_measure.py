"""One model in vLLM's offline engine: greedy tokens and generation throughput.

Runs in the vLLM environment (bench/vllm_env.sh), one model per process, started by
bench/vllm.py: `python bench/vllm_measure.py JOB.json` reads the model directory and the
token ids to run, and prints one line, "result: " and JSON. vLLM's engine starts processes of its own, hence
the guarded entry point.

Throughput is `LLM.generate` on every request at once (vLLM batches them as its scheduler
allows), and on one request: new tokens per second of wall time, prefill included, after a
warm-up generate that compiles and fills the caches.
"""

from __future__ import annotations

import json
import os
import sys
import time


def timed(llm, prompts, params) -> tuple[float, int]:
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outputs)


def measure(job: dict) -> dict:
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(model=job["model"], dtype=job.get("dtype", "float32"), max_model_len=job["max_model_len"],
              max_num_seqs=job["batch"], seed=0)
    load_s = time.perf_counter() - started
    greedy = SamplingParams(temperature=0.0, max_tokens=job["greedy_tokens"], ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in job["greedy_prompts"]], greedy, use_tqdm=False)
    result = {"load_s": round(load_s, 1), "greedy": [list(o.outputs[0].token_ids) for o in outputs],
              "vllm_version": __import__("vllm").__version__}

    params = SamplingParams(temperature=0.0, max_tokens=job["new_tokens"], ignore_eos=True)
    prompts = job["throughput_prompts"]
    timed(llm, prompts[:4], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))  # warm-up
    for label, batch in (("batch", prompts[: job["batch"]]), ("single", prompts[:1])):
        runs = []
        for _ in range(job["repeats"]):
            elapsed, tokens = timed(llm, batch, params)
            runs.append({"seconds": round(elapsed, 3), "new_tokens": tokens,
                         "tokens_per_s": round(tokens / elapsed, 2)})
        result[label] = {"requests": len(batch), "runs": runs,
                         "tokens_per_s": max(r["tokens_per_s"] for r in runs)}
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return result


if __name__ == "__main__":
    with open(sys.argv[1]) as handle:
        job = json.load(handle)
    print("result: " + json.dumps(measure(job)), flush=True)  # vLLM logs on stdout too
