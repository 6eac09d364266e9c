"""The llama.cpp side of bench/llama_cpp_smollm2.py: runs in an environment with llama-cpp-python and no torch.

Reads a job (JSON) and writes its figures (JSON). Jobs:
- logits: evaluate token ids with every position's logits, compare with transformers' (.npy);
  check that llama.cpp tokenizes the text as transformers did; greedy-generate a few tokens.
- ppl: perplexity over non-overlapping chunks of the given token ids (all positions but the
  first of each chunk predicted, as slicegpt's WikiText-2 protocol).
- speed: prefill and decode tokens/s at batch 1, the models measured in turns within each
  repeat, medians; the load average is recorded (the machine is shared).

llama.cpp's extra CPU buffer types (AMX and weight repacking) are switched off unless
SLICEGPT_LLAMA_EXTRA_BUFFERS=1: with a `-march=native` build on this VM, the AMX kernels
used for quantized types die with SIGILL (the CPU reports AMX). Every model runs the same
way, so ratios compare like with like.

    /path/to/llama-venv/bin/python bench/llama_cpp_measure.py JOB.json RESULT.json
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import numpy as np
import llama_cpp


def _without_extra_buffers():
    """Model parameters with llama.cpp's extra CPU buffer types (AMX, weight repacking) off: on this
    machine's VM the AMX kernels that quantized types use stop the process with SIGILL."""
    params = _default_model_params()
    params.use_extra_bufts = False
    return params


_default_model_params = llama_cpp.llama_model_default_params
if os.environ.get("SLICEGPT_LLAMA_EXTRA_BUFFERS") != "1":
    llama_cpp.llama.llama_cpp.llama_model_default_params = _without_extra_buffers


def load(path: str, n_ctx: int, threads: int, logits_all: bool = False) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_threads=threads,
                           n_threads_batch=threads, logits_all=logits_all, verbose=False)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row by row in blocks (a 2048 x 49152 float64 copy would be 800 MB)."""
    out = np.empty(logits.shape, dtype=np.float32)
    for start in range(0, len(logits), 128):
        block = logits[start: start + 128].astype(np.float64)
        shifted = block - block.max(-1, keepdims=True)
        out[start: start + 128] = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return out


def all_logits(llm: llama_cpp.Llama, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def logits_job(job: dict) -> dict:
    ids = json.load(open(job["ids"]))
    reference = np.load(job["reference_logits"])
    llm = load(job["model"], n_ctx=max(len(ids), 64) + 64, threads=job["threads"], logits_all=True)
    ours = all_logits(llm, ids)
    diff = np.abs(ours - reference)
    scale = np.abs(reference).max()
    same_top1 = float((ours.argmax(-1) == reference.argmax(-1)).mean())
    lp_ours, lp_ref = log_softmax(ours), log_softmax(reference)

    def nll(lp):
        return float(-lp[np.arange(len(ids) - 1), ids[1:]].astype(np.float64).mean())

    tokens = llm.tokenize(job["text"].encode(), add_bos=False, special=False)
    llm.reset()
    prompt = llm.tokenize(job["prompt"].encode(), add_bos=False, special=False)
    generated = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        if token == llm.token_eos() or len(generated) == job["new_tokens"]:
            break
        generated.append(token)
    return {"model": job["model"], "positions": len(ids), "max_abs_diff": float(diff.max()),
            "mean_abs_diff": float(diff.mean()), "max_abs_reference": float(scale),
            "max_abs_diff_log_probs": float(np.abs(lp_ours - lp_ref).max()),
            "top1_agreement": same_top1, "nll_llama_cpp": nll(lp_ours), "nll_transformers": nll(lp_ref),
            "tokenization_matches": tokens == ids, "generated_ids": generated,
            "generated_text": llm.detokenize(generated).decode(errors="replace")}


def ppl_job(job: dict) -> dict:
    ids = json.load(open(job["ids"]))
    seqlen, chunks = job["seqlen"], job["chunks"]
    llm = load(job["model"], n_ctx=seqlen, threads=job["threads"], logits_all=True)
    total, count = 0.0, 0
    start = time.perf_counter()
    for index in range(chunks):
        chunk = ids[index * seqlen: (index + 1) * seqlen]
        lp = log_softmax(all_logits(llm, chunk))
        total -= float(lp[np.arange(len(chunk) - 1), chunk[1:]].astype(np.float64).sum())
        count += len(chunk) - 1
    return {"model": job["model"], "ppl": float(np.exp(total / count)), "tokens": count, "chunks": chunks,
            "seqlen": seqlen, "seconds": round(time.perf_counter() - start, 1)}


def time_model(llm: llama_cpp.Llama, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) for one prompt and `new_tokens` single-token steps."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prefill = len(prompt) / (time.perf_counter() - start)
    token = prompt[-1]
    start = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([token])
    decode = new_tokens / (time.perf_counter() - start)
    return prefill, decode


def speed_job(job: dict) -> dict:
    prompt = json.load(open(job["ids"]))[: job["prompt_len"]]
    models = {name: load(path, n_ctx=job["prompt_len"] + job["new_tokens"] + 8, threads=job["threads"])
              for name, path in job["models"].items()}
    for llm in models.values():  # warm up: page the weights in
        time_model(llm, prompt, 4)
    runs = {name: {"prefill": [], "decode": []} for name in models}
    load_before = os.getloadavg()
    for repeat in range(job["repeats"]):
        order = list(models) if repeat % 2 == 0 else list(reversed(models))
        for name in order:
            prefill, decode = time_model(models[name], prompt, job["new_tokens"])
            runs[name]["prefill"].append(prefill)
            runs[name]["decode"].append(decode)
        print(f"repeat {repeat + 1}/{job['repeats']}", file=sys.stderr, flush=True)
    first = next(iter(models))
    result = {"models": job["models"], "threads": job["threads"], "prompt_len": len(prompt),
              "new_tokens": job["new_tokens"], "repeats": job["repeats"],
              "load_average_1_5_15_before": [round(x, 2) for x in load_before],
              "load_average_1_5_15_after": [round(x, 2) for x in os.getloadavg()], "runs": runs, "median": {},
              "paired_ratio_vs_" + first: {}}
    for name, run in runs.items():
        result["median"][name] = {kind: statistics.median(values) for kind, values in run.items()}
        result["paired_ratio_vs_" + first][name] = {
            kind: statistics.median(v / b for v, b in zip(run[kind], runs[first][kind])) for kind in run}
    return result


JOBS = {"logits": logits_job, "ppl": ppl_job, "speed": speed_job}

if __name__ == "__main__":
    job = json.load(open(sys.argv[1]))
    result = JOBS[job["kind"]](job)
    result["llama_cpp_python"] = llama_cpp.__version__
    json.dump(result, open(sys.argv[2], "w"), indent=2)
