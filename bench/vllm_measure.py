"""One model in vLLM's offline engine: greedy tokens, then timed generates on request.

Runs in the vLLM environment (bench/vllm_env.sh), one model per process, started by
bench/vllm.py: `python bench/vllm_measure.py JOB.json` loads the model the job names, runs
the greedy prompts (their tokens and text) and a warm-up, prints "ready: {json}", then for every line "batch" or
"single" on its standard input times one `LLM.generate` (every throughput request at once,
or the first alone) and prints "result: {json}". bench/vllm.py keeps one such process per
model and asks them in turns, so a load that changes during the run reaches every model
alike. vLLM's engine starts processes of its own, hence the guarded entry point.
"""

from __future__ import annotations

import json
import sys
import time


def timed(llm, prompts, params) -> dict:
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"requests": len(prompts), "seconds": round(elapsed, 3), "new_tokens": tokens,
            "tokens_per_s": round(tokens / elapsed, 2)}


def say(tag: str, payload: dict) -> None:
    print(f"{tag}: {json.dumps(payload)}", flush=True)  # vLLM logs on stdout too, hence the tag


def serve(job: dict) -> None:
    import vllm
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(model=job["model"], dtype=job.get("dtype", "float32"), max_model_len=job["max_model_len"],
              max_num_seqs=job["batch"], enforce_eager=job.get("enforce_eager", False), seed=0)
    load_s = time.perf_counter() - started
    greedy = SamplingParams(temperature=0.0, max_tokens=job["greedy_tokens"], ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in job["greedy_prompts"]], greedy, use_tqdm=False)
    prompts = job["throughput_prompts"]
    params = SamplingParams(temperature=0.0, max_tokens=job["new_tokens"], ignore_eos=True)
    timed(llm, prompts[:4], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))  # warm-up
    say("ready", {"load_s": round(load_s, 1), "greedy": [list(o.outputs[0].token_ids) for o in outputs],
                  "greedy_text": [o.outputs[0].text for o in outputs], "vllm_version": vllm.__version__})
    for line in sys.stdin:
        what = line.strip()
        if what == "batch":
            say("result", timed(llm, prompts[: job["batch"]], params))
        elif what == "single":
            say("result", timed(llm, prompts[:1], params))
        elif what == "quit":
            break


if __name__ == "__main__":
    with open(sys.argv[1]) as handle:
        serve(json.load(handle))
