"""One model behind `vllm serve`, asked through the `openai` client: the text it gives, and requests/s.

Runs in the vLLM environment (bench/vllm_env.sh, which installs `openai`), started by
bench/vllm.py: `python bench/vllm_serve.py JOB.json` starts `vllm serve DIR` on a free
loopback port (127.0.0.1 only) in a process group of its own, waits until /health answers
(at most `ready_timeout_s`), sends the greedy prompts one at a time (temperature 0, fixed
max_tokens, end-of-sequence ignored, as the offline engine ran them) and compares the text
with the offline engine's, then sends a burst of `burst` requests at once (bounded in count,
and in time by `burst_timeout_s` and each request's `request_timeout_s`) and reports the
completed requests per second. The server is stopped whatever happens (SIGTERM to its
group, SIGKILL after a grace period); this process turns SIGTERM into an exit so that it
stops the server too. Prints "result: {json}".
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

HOST = "127.0.0.1"
SERVED_NAME = "bench"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def serve_command(job: dict, port: int, vllm: str) -> list[str]:
    command = [vllm, "serve", job["model"], "--host", HOST, "--port", str(port), "--served-model-name", SERVED_NAME,
               "--dtype", job.get("dtype", "float32"), "--max-model-len", str(job["max_model_len"]),
               "--max-num-seqs", str(job["burst"]), "--seed", "0"]
    return command + (["--enforce-eager"] if job.get("enforce_eager") else [])


class Server:
    """A `vllm serve` process and the processes it starts (one process group), logging to a file."""

    def __init__(self, command: list[str], log: Path):
        self.log = log
        with log.open("w") as handle:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=handle,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM to the group, then after `grace_s` (or once the server has gone) SIGKILL to whatever
        of the group is left: vLLM's engine runs in processes of its own."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        # SIGKILL is delivered asynchronously: on a busy machine the group's other members can still be
        # running for a moment after the leader is reaped, and the port stays taken until they are gone.
        deadline = time.monotonic() + grace_s
        while group_members(self.process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def group_members(pgid: int) -> list[int]:
    """Live processes of a process group, read from /proc (zombies, which init may never reap, are not live)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(group) == pgid and state != "Z":
            found.append(int(stat.parent.name))
    return found


def start_server(job: dict, port: int) -> Server:
    vllm = Path(sys.executable).with_name("vllm")
    vllm = str(vllm) if vllm.is_file() else shutil.which("vllm")
    if vllm is None:
        raise RuntimeError("no `vllm` program beside this Python or on PATH")
    return Server(serve_command(job, port, vllm), Path(job["log"]))


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def wait_ready(server, url: str, timeout_s: float, probe=http_ok, sleep=time.sleep, clock=time.monotonic) -> float:
    """Seconds until `url` answers; an error when the server exits or `timeout_s` passes first."""
    start = clock()
    while True:
        if probe(url):
            return clock() - start
        if not server.alive():
            raise RuntimeError(f"vllm serve exited before it was ready:\n{server.tail()}")
        if clock() - start > timeout_s:
            raise TimeoutError(f"vllm serve not ready after {timeout_s:.0f} s:\n{server.tail()}")
        sleep(1.0)


def openai_client(base_url: str, timeout_s: float):
    from openai import OpenAI

    return OpenAI(base_url=base_url, api_key="unused", timeout=timeout_s, max_retries=0)


def complete(client, prompt: list[int], max_tokens: int) -> tuple[str, int]:
    """One greedy completion of token ids: (its text, its tokens)."""
    response = client.completions.create(model=SERVED_NAME, prompt=prompt, temperature=0.0, max_tokens=max_tokens,
                                         extra_body={"ignore_eos": True})
    usage = getattr(response, "usage", None)
    return response.choices[0].text, (usage.completion_tokens if usage is not None else max_tokens)


def burst(send, count: int, timeout_s: float, clock=time.perf_counter) -> dict:
    """`count` calls of send(i) at once, waited for at most `timeout_s`: completed requests per second."""
    pool = ThreadPoolExecutor(max_workers=count)
    start = clock()
    futures = [pool.submit(send, i) for i in range(count)]
    done, pending = wait(futures, timeout=timeout_s)
    seconds = clock() - start
    pool.shutdown(wait=False, cancel_futures=True)
    failed = [f.exception() for f in done if f.exception() is not None]
    tokens = sum(f.result() for f in done if f.exception() is None)
    completed = len(done) - len(failed)
    return {"requests": count, "completed": completed, "failed": len(failed), "unfinished": len(pending),
            "timed_out": bool(pending), "seconds": round(seconds, 3),
            "requests_per_s": round(completed / seconds, 3) if seconds > 0 else None,
            "new_tokens_per_s": round(tokens / seconds, 2) if seconds > 0 else None,
            "errors": [repr(e) for e in failed[:3]]}


def serve_job(job: dict, start=start_server, make_client=openai_client, probe=http_ok, port: int | None = None,
              sleep=time.sleep) -> dict:
    port = port or free_port()
    server = start(job, port)
    try:
        ready_s = wait_ready(server, f"http://{HOST}:{port}/health", job["ready_timeout_s"], probe, sleep=sleep)
        client = make_client(f"http://{HOST}:{port}/v1", job["request_timeout_s"])
        texts = [complete(client, prompt, job["greedy_tokens"])[0] for prompt in job["greedy_prompts"]]
        prompts = job["burst_prompts"]
        timing = burst(lambda i: complete(client, prompts[i % len(prompts)], job["burst_tokens"])[1], job["burst"],
                       job["burst_timeout_s"])
        result = {"text_equal_offline": texts == job["offline_texts"], "requests_per_s": timing["requests_per_s"],
                  "ready_s": round(ready_s, 1), "port": port, "burst": timing}
        if not result["text_equal_offline"]:
            result["texts"], result["offline_texts"] = texts, job["offline_texts"]
        return result
    finally:
        server.stop()


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through serve_job's finally: the server is stopped


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    with open(sys.argv[1]) as handle:
        result = serve_job(json.load(handle))
    print(f"result: {json.dumps(result)}", flush=True)
