"""Training and calibration text written by the teacher: samples from the dense model itself.

Recovery by distillation needs no labelled corpus: the teacher can write the text it is
distilled on, and its own samples are text it is sure of (LLM-QAT found a model's own
generations served better than real data for recovering a quantized model). Samples start
either from the beginning-of-text token alone or from a short opening (a few tokens) of a
calibration row; `prompts="mixed"` alternates the two by batch. Only the continuation is
kept as text: the openings steer the topic without adding the corpus itself.

The rows go to a JSONL file (`{"text", "tokens", "batch", "prompt"}`) with a sidecar
`.json` holding the settings. Each batch is sampled with a generator seeded from the seed
and the batch's index and written in one append, so a run stopped at any point continues
from the last whole batch and ends with the same file as an uninterrupted one; a request
for more tokens extends the file, a request for fewer reads its first rows.

Runs often share one file (a learning-rate sweep into sibling outputs, slices at several
sparsities): a run holds an exclusive lock on the file while it writes, so a second run
waits, then reads what the first wrote and continues it where it asks for more, and the
file holds one run's rows, not two interleaved. A sample ends at the tokenizer's
end-of-text or any of the model's `generation_config.eos_token_id` (Llama 3 ends turns
with `<|eot_id|>`, which its tokenizer does not call end-of-text).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import inspect
import json
import math
import os
import random
import sys
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from slicegpt.errors import SliceGPTError
from slicegpt.validation.options import at_least, fraction, positive, seed_range, text_list

PROMPTS = ("bos", "openings", "mixed")
# Batches in a row without a token before a run gives up: a teacher that ends every sample
# at once would otherwise write empty rows for ever.
EMPTY_BATCHES = 16


@dataclass
class TeacherTextConfig:
    """How the teacher writes: `tokens` in all, in samples of up to `sample_tokens` new tokens."""

    tokens: int = 1_000_000
    seed: int = 42
    temperature: float = 1.0
    top_p: float = 0.95
    prompts: str = "mixed"
    opening_tokens: int = 8
    sample_tokens: int = 512
    batch_size: int = 8

    def __post_init__(self) -> None:
        check_settings(self)

    def sampling(self) -> dict:
        """Everything that decides the text but its length: a file is reused only if these match."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "tokens"}


def _teacher_name(attribute: str) -> str:
    return "teacher " + attribute.replace("_", "-")


def check_settings(values, prefix: str = "", name=_teacher_name) -> None:
    """The ranges of the sampling settings: read as `prefix + field` from a TeacherTextConfig, or from
    the parsed command line with prefix "teacher_"; `name` is what a refusal calls a setting."""
    for field in ("tokens", "sample_tokens", "batch_size", "opening_tokens"):
        at_least(values, prefix + field, 1, name(prefix + field))
    positive(values, prefix + "temperature", name(prefix + "temperature"))
    fraction(values, prefix + "top_p", low_open=True, high_open=False, option=name(prefix + "top_p"))
    seed_range(values, prefix + "seed", name(prefix + "seed"))
    prompts = getattr(values, prefix + "prompts", None)
    if prompts is not None and prompts not in PROMPTS:
        raise SliceGPTError(f"{name(prefix + 'prompts')} must be one of {', '.join(PROMPTS)}, got {prompts}")


def default_path(directory: Path, teacher: str, config: TeacherTextConfig) -> Path:
    """The file a run in `directory` writes or reuses: named by the teacher and the sampling settings."""
    key = json.dumps({"teacher": str(teacher), **config.sampling()}, sort_keys=True)
    return directory / f"teacher-text-{hashlib.sha256(key.encode()).hexdigest()[:10]}.jsonl"


def texts_sha256(texts: list[str]) -> str:
    """The identity of a training text: sha256 over its rows, NUL-separated."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _saved_settings(path: Path) -> dict | None:
    """The settings a teacher-text file was written with, or None where it has none yet."""
    sidecar = _sidecar(path)
    if not sidecar.is_file():
        return None
    try:
        saved = json.loads(sidecar.read_text())["settings"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        saved = None
    if not isinstance(saved, dict) or "teacher" not in saved:
        raise SliceGPTError(f"{path} is not a teacher-text file: {sidecar.name} beside it is not its settings file")
    return saved


def check_text_file(path: str | Path) -> None:
    """`path` can hold teacher text: it is absent, empty, or a teacher-text file with its settings
    beside it; anything else is a file this run must not append to."""
    path = Path(path)
    if _sidecar(path) == path:
        raise SliceGPTError(f"{path}: a teacher-text file's settings go to a .json beside it; name it .jsonl")
    if path.is_dir() or (path.exists() and not path.is_file()):
        raise SliceGPTError(f"{path} is not a regular file")
    empty = not path.exists() or path.stat().st_size == 0
    if _saved_settings(path) is None and not empty:
        raise SliceGPTError(f"{path} exists without its settings file {_sidecar(path).name}, so it is not a "
                            "teacher-text file; remove it or choose another path")


def _claim(path: Path, settings: dict) -> None:
    """Write the settings beside a new file, or refuse a file written with other settings."""
    saved = _saved_settings(path)
    if saved is None:
        _sidecar(path).write_text(json.dumps({"settings": settings}, indent=1) + "\n")
    elif saved != settings:
        changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        raise SliceGPTError(f"{path} was written with other settings ({', '.join(changed)}); use the same "
                            f"settings, another path, or remove it and {_sidecar(path).name}")


@contextmanager
def _writing(path: Path):
    """Hold the file's exclusive lock: another run writing it is waited for (the kernel drops the
    lock of a run that dies, kill -9 included)."""
    with open(path, "ab") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"slicegpt: waiting for another run writing {path}", file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _read_rows(path: Path, batch_size: int) -> list[dict]:
    """The whole batches in `path`; a batch cut short by a kill is dropped and the file trimmed to match."""
    if not path.is_file():
        return []
    rows, ends = [], []
    raw = path.read_bytes()
    for line in raw.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
        ends.append((ends[-1] if ends else 0) + len(line))
    whole = len(rows) // batch_size * batch_size
    keep = ends[whole - 1] if whole else 0
    if keep < len(raw):
        with open(path, "r+b") as handle:
            handle.truncate(keep)
    return rows[:whole]


def _prompt(tokenizer, config: TeacherTextConfig, batch: int, openings: list[list[int]]) -> tuple[str, list[list[int]]]:
    """(kind, prompt ids per sample) of one batch: every prompt in a batch has the same length."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    kind = config.prompts if config.prompts != "mixed" else ("bos", "openings")[batch % 2]
    if kind == "bos" or not openings:
        return "bos", [[start]] * config.batch_size
    chooser = random.Random(config.seed * 1_000_003 + batch)
    return kind, [[start, *chooser.choice(openings)] for _ in range(config.batch_size)]


def _openings(tokenizer, texts: list[str] | None, count: int) -> list[list[int]]:
    """The first `count` tokens of every calibration row that has that many."""
    openings = []
    for text in texts or []:
        if text.strip():
            ids = tokenizer(text.strip(), add_special_tokens=False)["input_ids"]
            if len(ids) >= count:
                openings.append(ids[:count])
    return openings


def nucleus_sample(probs: torch.Tensor, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token per row from the smallest set of most likely tokens whose mass reaches `top_p`.

    The set is looked for among the 1024 most likely tokens first (a sort of the whole
    vocabulary costs more than a small model's forward step) and in the whole vocabulary
    only where those fall short of `top_p`.
    """
    if top_p >= 1:
        return torch.multinomial(probs, 1, generator=generator)
    head = min(probs.shape[-1], 1024)
    top, order = probs.topk(head, dim=-1)
    if head < probs.shape[-1] and not bool((top.sum(-1) >= top_p).all()):
        top, order = probs.sort(dim=-1, descending=True)
    top = top.masked_fill(top.cumsum(-1) - top > top_p, 0)  # keeps the token that crosses top_p
    return order.gather(-1, torch.multinomial(top, 1, generator=generator))


def stop_tokens(model: nn.Module, tokenizer) -> list[int]:
    """The ids that end a sample: the tokenizer's end-of-text and the model's generation stops (an int or a list)."""
    stops = {tokenizer.eos_token_id}
    found = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops.update(found if isinstance(found, (list, tuple)) else [found])
    return sorted(token for token in stops if token is not None)


@torch.no_grad()
def sample(model: nn.Module, prompts: torch.Tensor, new_tokens: int, temperature: float, top_p: float,
           generator: torch.Generator, stop: int | Iterable[int] | None) -> list[list[int]]:
    """Nucleus samples continuing each prompt row; each ends before its first `stop` token (one id or several)."""
    stops = torch.tensor([] if stop is None else [stop] if isinstance(stop, int) else list(stop), dtype=torch.long)
    device = next(model.parameters()).device
    ids = prompts.to(device)
    # transformers renamed `past_key_values` to `cache` (5.25 warns about the old name)
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=ids, use_cache=True)
    cache, logits = getattr(out, cache_name), out.logits[:, -1]
    written = torch.empty(len(ids), 0, dtype=torch.long)
    finished = torch.zeros(len(ids), dtype=torch.bool)
    for _ in range(new_tokens):
        token = nucleus_sample(torch.softmax(logits.float().cpu() / temperature, dim=-1), top_p, generator)
        written = torch.cat([written, token], dim=1)
        finished |= torch.isin(token[:, 0], stops)
        if finished.all():
            break
        out = model(input_ids=token.to(device), use_cache=True, **{cache_name: cache})
        cache, logits = getattr(out, cache_name), out.logits[:, -1]
    ends = set(stops.tolist())
    return [_until(row, ends) for row in written.tolist()]


def _until(row: list[int], stops: set[int]) -> list[int]:
    """`row` up to its first stop token."""
    return next((row[:i] for i, token in enumerate(row) if token in stops), row)


def _batch_seed(config: TeacherTextConfig, batch: int) -> int:
    """The seed of one batch's generator; torch reads seeds modulo 2**64, so any seed gives one."""
    return (config.seed * 1_000_003 + batch) % 2**64


def _append(path: Path, rows: list[dict]) -> None:
    """Whole batches in one write, flushed to disk: a kill leaves at most the last one cut short."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        handle.flush()
        os.fsync(handle.fileno())


def write_teacher_text(model: nn.Module, tokenizer, path: Path, config: TeacherTextConfig, teacher: str,
                       opening_texts: list[str] | None = None, progress: bool = True) -> dict:
    """Make `path` hold at least `config.tokens` tokens of the teacher's text; a summary of what it holds.

    Resumes a file written before with the same settings; refuses one written with others.
    A run that finds another writing the file waits for it, then reuses what it wrote.
    """
    path = Path(path)
    if opening_texts is not None:
        text_list(opening_texts, "opening_texts")
    check_text_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _writing(path):
        _claim(path, {"teacher": str(teacher), **config.sampling()})
        _write_batches(model, tokenizer, path, config, opening_texts, progress)
        return summary(path, config.tokens)


def _write_batches(model: nn.Module, tokenizer, path: Path, config: TeacherTextConfig,
                   opening_texts: list[str] | None, progress: bool) -> None:
    """Sample batches after the whole ones in `path` until it holds `config.tokens` tokens."""
    rows = _read_rows(path, config.batch_size)
    have = sum(r["tokens"] for r in rows)
    openings = _openings(tokenizer, opening_texts, config.opening_tokens) if config.prompts != "bos" else []
    if config.prompts == "openings" and not openings:
        raise SliceGPTError(f"teacher prompts 'openings' need calibration text with rows of at least "
                            f"{config.opening_tokens} tokens")
    stops = stop_tokens(model, tokenizer)
    was_training = model.training
    model.eval()
    bar = tqdm(total=config.tokens, initial=min(have, config.tokens), desc="Teacher writing", unit="tok",
               disable=not progress or have >= config.tokens)
    batch = len(rows) // config.batch_size
    empty: list[dict] = []  # batches without a token, written only once one with text follows
    while have < config.tokens:
        kind, prompts = _prompt(tokenizer, config, batch, openings)
        generator = torch.Generator().manual_seed(_batch_seed(config, batch))
        written = sample(model, torch.tensor(prompts), config.sample_tokens, config.temperature, config.top_p,
                         generator, stops)
        new = [{"batch": batch, "prompt": kind, "tokens": len(ids),
                "text": tokenizer.decode(ids, skip_special_tokens=True)} for ids in written]
        batch += 1
        added = sum(r["tokens"] for r in new)
        if added == 0:
            empty += new
            _check_progress(len(empty) // config.batch_size, batch, stops)
            continue
        _append(path, empty + new)
        empty = []
        bar.update(min(added, config.tokens - have))
        have += added
    bar.close()
    model.train(was_training)


def _check_progress(empty_batches: int, batch: int, stops: list[int]) -> None:
    """Refuse to go on when the teacher has ended every sample at once for EMPTY_BATCHES batches."""
    if empty_batches >= EMPTY_BATCHES:
        raise SliceGPTError(f"the teacher ended every sample at its first token in {empty_batches} batches in a "
                            f"row (batches {batch - empty_batches} to {batch - 1}; end tokens {stops}): it writes no text "
                            "to learn from; check the teacher and its end-of-text tokens")


def read_teacher_text(path: Path, tokens: int | None = None) -> list[dict]:
    """The rows of `path` up to the first `tokens` generated tokens (all rows without a count)."""
    rows, have = [], 0
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if tokens is not None and have >= tokens:
            break
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        rows.append(row)
        have += row["tokens"]
    return rows


def summary(path: Path, tokens: int | None = None) -> dict:
    """What a teacher-text file holds for a request of `tokens`: its settings, size and hash."""
    rows = read_teacher_text(path, tokens)
    texts = [r["text"] for r in rows]
    settings = json.loads(_sidecar(Path(path)).read_text())["settings"] if _sidecar(Path(path)).is_file() else {}
    return {"source": "teacher", "path": str(path), "rows": len(rows), "tokens": sum(r["tokens"] for r in rows),
            "sha256": texts_sha256(texts), "settings": settings}


def calibration_texts(model: nn.Module, tokenizer, directory: Path, teacher: str, samples: int, seqlen: int,
                      seed: int, progress: bool = True) -> tuple[list[str], dict]:
    """Calibration text the model writes itself (`slice --cal-data teacher`): enough for `samples` x `seqlen`.

    Samples start from the beginning-of-text token alone (there is no other text to open
    with); 5% more tokens than the windows need, since decoded text re-tokenizes a little
    differently. The file goes to `directory`, named as a fine-tuning run would name it.
    """
    config = TeacherTextConfig(tokens=math.ceil(samples * seqlen * 1.05), seed=seed, prompts="bos")
    path = default_path(Path(directory), teacher, config)
    found = write_teacher_text(model, tokenizer, path, config, teacher, progress=progress)
    return [row["text"] for row in read_teacher_text(path, config.tokens)], found
