"""What the benchmark scripts share: protocol P's settings and data, result files that resume,
processes of their own, and "slice, then measure".

A script run as `python bench/NAME.py` has bench/ on its path, so it imports this module as
`harness`.
- Paths: the repository, bench/results, and the data beside the repository in
  ../shared/data (WikiText-2 and the LAMBADA passages; see that folder's README).
- Protocol P: SmolLM2-135M, seed 42, calibration 64 x 2048 tokens of WikiText-2 (v1)
  validation, perplexity on the first 16 chunks of 2048 tokens of WikiText-2 raw test and of
  the LAMBADA (OpenAI) test passages, 2 threads.
- Rows: a results file that grows by one row per finished measurement, so that a rerun skips
  what is there (JSON lines, or the "rows" of a JSON document).
- Processes: a function run in a Python process of its own (its peak RSS is its own), a
  command watched for its peak RSS and its RSS over time, slicegpt's CLI, and a JSON job for
  a script that runs in another Python (llama.cpp's, vLLM's).
- `measure_slice`: load a model, calibrate and slice it, and measure the slice: perplexity,
  real parameters, time and memory.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DATA = ROOT.parent / "shared" / "data"
CAL_DATA = DATA / "wikitext-2" / "wikitext-2-v1.validation.jsonl"
WIKITEXT_TEST = DATA / "wikitext-2" / "wikitext-2-raw-v1.test.jsonl"
LAMBADA = DATA / "lambada" / "lambada_openai.test.jsonl"
CORPORA = {"wikitext2": WIKITEXT_TEST, "lambada": LAMBADA}  # perplexity corpora by the name rows give them

# Protocol P.
MODEL = "smollm2-135m"
SEED = 42
CAL_SAMPLES = 64
CAL_SEQLEN = 2048
PPL_CHUNKS = 16
PPL_SEQLEN = 2048
THREADS = 2


# -- result files ---------------------------------------------------------------------------------

def write_json(path: Path, data, indent: int = 2) -> None:
    """`data` as JSON, replacing the file only once it is whole (a kill leaves the old one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=indent) + "\n")
    os.replace(partial, path)


def read_rows(path: Path) -> list[dict]:
    """Every complete row of a JSON-lines file; a line cut short by a kill is ignored (the rerun measures it again)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def append_row(path: Path, row: dict) -> None:
    """One line, flushed to disk before the next measurement starts; a line cut short by a kill is ended
    first, so it cannot swallow this row."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cut_short = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    with open(path, "a") as handle:
        if cut_short:
            handle.write("\n")
        handle.write(json.dumps(row, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


class Rows:
    """The rows of one results file and what each measured (`key(row)`), so that a rerun skips it."""

    def __init__(self, path: Path, key: Callable[[dict], Hashable]):
        self.path, self.key = Path(path), key

    def rows(self) -> list[dict]:
        raise NotImplementedError

    def add(self, row: dict) -> None:
        raise NotImplementedError

    def measured(self) -> set:
        return {self.key(row) for row in self.rows()}


class RowsFile(Rows):
    """JSON lines: each row appended as its measurement finishes."""

    def rows(self) -> list[dict]:
        return read_rows(self.path)

    def add(self, row: dict) -> None:
        append_row(self.path, row)


class RowsDocument(Rows):
    """A JSON document's "rows": the document is written whole after each new row, its other fields
    from `document(rows)`. `fresh` drops the rows already there."""

    def __init__(self, path: Path, key: Callable[[dict], Hashable], document: Callable[[list[dict]], dict],
                 fresh: bool = False):
        super().__init__(path, key)
        self.document = document
        self._rows = [] if fresh or not self.path.is_file() else json.loads(self.path.read_text())["rows"]

    def rows(self) -> list[dict]:
        return list(self._rows)

    def add(self, row: dict) -> None:
        self._rows.append(row)
        self.write()

    def write(self) -> None:
        write_json(self.path, self.document(self.rows()))


# -- processes ------------------------------------------------------------------------------------

def run_isolated(function: Callable, *args):
    """function(*args) in a Python process of its own, so that its peak RSS, threads and allocator are
    that run's alone. `function` is a module-level function of a file (a bench script or this module);
    the arguments and the result travel as JSON. Exits with the child's standard error if it fails."""
    source = Path(inspect.getfile(inspect.unwrap(function))).resolve()  # a decorator's file is not the function's
    command = [sys.executable, str(Path(__file__).resolve()), str(source), function.__name__, json.dumps(args)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _call_in_child(source: str, name: str, args: str) -> None:
    """The child's side of `run_isolated`: the result on the last line of standard output."""
    path = Path(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # registered before it runs: its dataclasses look themselves up
    spec.loader.exec_module(module)
    print(json.dumps(getattr(module, name)(*json.loads(args))), flush=True)


def rss_bytes(pid: int) -> int | None:
    """A process's resident memory now, or None once it has gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclass
class Watched:
    """What `run_watched` saw of one command."""
    returncode: int
    stdout: str
    stderr: str
    usage: resource.struct_rusage  # the child's own (wait4): peak RSS, CPU time, page faults
    wall_s: float
    rss_samples: list[tuple[float, int]]  # (seconds since the start, resident bytes)

    @property
    def peak_rss_bytes(self) -> int:
        return self.usage.ru_maxrss * 1024


def run_watched(command: list[str], env: dict | None = None, every_s: float = 0.5) -> Watched:
    """`command` in a child process, its resident memory sampled every `every_s` seconds; its own peak
    RSS and CPU time from wait4. Its output goes to files, so a long one cannot block it."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        child = subprocess.Popen(command, env=env, stdout=out, stderr=err)
        samples: list[tuple[float, int]] = []
        done = threading.Event()

        def sample() -> None:
            while not done.wait(every_s):
                rss = rss_bytes(child.pid)
                if rss is not None:
                    samples.append((round(time.perf_counter() - start, 1), rss))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Watched(child.returncode, out.read(), err.read(), usage, wall, samples)


def slicegpt_command(*args: str) -> list[str]:
    """`slicegpt ARGS`, run by this Python."""
    return [sys.executable, "-m", "slicegpt.cli", *args]


def run_slicegpt(*args: str) -> str:
    """`slicegpt ARGS` in a child process: its standard output (its standard error passes through);
    an error if it fails."""
    return subprocess.run(slicegpt_command(*args), check=True, stdout=subprocess.PIPE, text=True).stdout


def run_job(python: str, script: str, job: dict, job_file: Path, result_file: Path) -> dict:
    """`PYTHON bench/SCRIPT JOB RESULT`: a job for a script that runs in another environment (one
    without torch, or with another torch), and the result it writes."""
    Path(job_file).write_text(json.dumps(job))
    subprocess.run([python, str(ROOT / "bench" / script), str(job_file), str(result_file)], check=True)
    return json.loads(Path(result_file).read_text())


def git_commit() -> str:
    """The checkout's short commit, or "unknown"."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def shown(path: Path) -> Path:
    """A path as printed: relative to the repository where it lies inside it."""
    try:
        return Path(path).relative_to(ROOT)
    except ValueError:
        return Path(path)


def load_average() -> list[float]:
    """The machine's load over 1, 5 and 15 minutes: the machine is shared, so every timing records it."""
    return [round(x, 2) for x in os.getloadavg()]


def peak_rss_gib() -> float:
    """This process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# -- slice, then measure --------------------------------------------------------------------------

@dataclass
class SliceRun:
    """One slice and what is measured on it: the slice is `settings` (SliceConfig's) on protocol P's
    calibration unless told otherwise; perplexity on `corpora` (names of CORPORA)."""
    settings: dict
    model: str = MODEL
    cal_samples: int = CAL_SAMPLES
    cal_seqlen: int = CAL_SEQLEN
    cal_batch_size: int | None = None  # None: the library's default
    ppl_chunks: int = PPL_CHUNKS
    ppl_seqlen: int = PPL_SEQLEN
    corpora: list[str] = field(default_factory=lambda: list(CORPORA))
    dense: bool = False  # the dense model's perplexities too
    baseline: bool = False  # one dense forward of the model body over the calibration tokens, timed
    refit_damping: float | None = None  # the refit's ridge weight (None: the library's)
    device: str = "cpu"
    threads: int = THREADS


def ppl_field(corpus: str, model: str) -> str:
    """A perplexity's row field: ppl_dense and ppl_sliced on WikiText-2, ppl_lambada_dense ... on the others."""
    return f"ppl_{model}" if corpus == "wikitext2" else f"ppl_{corpus}_{model}"


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def dense_body_forward_s(model, batches: list[dict], device: str = "cpu") -> float:
    """Seconds of one plain forward of the model body over `batches`: the cost baseline of slicing."""
    import torch

    body = model.get_decoder()
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    _sync(device)
    return time.perf_counter() - start


def measure_slice(run: SliceRun) -> dict:
    """Load `run.model`, slice it as `run` says and measure it, in this process: a row of real
    parameters (all, shortcuts, head, post-norm maps), perplexities, the calibrate-and-slice time,
    the layout the slice resolved to, and peak memory."""
    import torch

    from slicegpt import SliceConfig, calibration_data, load_model, perplexity, slice_model
    from slicegpt.architectures.families import family_for
    from slicegpt.io.data import load_texts
    from slicegpt.sizing.counts import count_parameters, head_parameters, shortcut_parameters

    torch.set_num_threads(run.threads)
    if run.refit_damping is not None:
        from slicegpt.method import refit

        refit.DAMPING = run.refit_damping
    model, tokenizer = load_model(run.model, device=run.device)
    family = family_for(model)  # before slicing: the head's count compares shapes with the dense width
    batch_size = {} if run.cal_batch_size is None else {"cal_batch_size": run.cal_batch_size}
    config = SliceConfig(**run.settings, cal_samples=run.cal_samples, cal_seqlen=run.cal_seqlen, seed=SEED,
                         **batch_size)
    batches = calibration_data(tokenizer, config, load_texts(str(CAL_DATA)))
    texts = {corpus: load_texts(str(CORPORA[corpus])) for corpus in run.corpora}

    def perplexities(which: str) -> dict:
        return {ppl_field(corpus, which): perplexity(model, tokenizer, corpus_texts, seqlen=run.ppl_seqlen,
                                                     chunks=run.ppl_chunks, progress=False)["ppl"]
                for corpus, corpus_texts in texts.items()}

    row = {"params_dense": count_parameters(model)}
    if run.refit_damping is not None:
        row["refit_damping"] = run.refit_damping
    if run.dense:
        row |= perplexities("dense")
    if run.baseline:
        row["dense_forward_s"] = dense_body_forward_s(model, batches, run.device)
    _sync(run.device)
    start = time.perf_counter()
    slice_model(model, tokenizer, config, batches, progress=False)
    _sync(run.device)
    row["calibrate_and_slice_s"] = time.perf_counter() - start
    row |= perplexities("sliced")
    slicing = model.config.slicing
    row |= {"rotations": slicing["config"]["rotations"], "pca": slicing["config"]["pca"],
            "widths": slicing["config"]["widths"], "width": slicing["embedding_width"],
            "params_sliced": count_parameters(model), "params_shortcuts": shortcut_parameters(model),
            "params_head": head_parameters(model, family),
            # The maps after Gemma's post-norms (sliced models of other families have none).
            "params_post_norm_maps": sum(p.numel() for n, p in model.named_parameters()
                                         if "_feedforward_layernorm.map." in n or "post_attention_layernorm.map." in n),
            "peak_rss_gib": peak_rss_gib()}
    if run.device.startswith("cuda"):
        row["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def measure_slice_isolated(run: SliceRun) -> dict:
    """`measure_slice` in a process of its own, so that the row's peak RSS is this slice's alone."""
    return run_isolated(_measure_slice_of, dataclasses.asdict(run))


def _measure_slice_of(fields: dict) -> dict:
    return measure_slice(SliceRun(**fields))


if __name__ == "__main__":
    _call_in_child(*sys.argv[1:])
