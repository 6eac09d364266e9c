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
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from slicegpt.errors import SliceGPTError

PROMPTS = ("bos", "openings", "mixed")


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
        for name in ("tokens", "sample_tokens", "batch_size", "opening_tokens"):
            if getattr(self, name) < 1:
                raise SliceGPTError(f"teacher {name.replace('_', ' ')} must be at least 1, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise SliceGPTError(f"teacher temperature must be positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SliceGPTError(f"teacher top-p must be in (0, 1], got {self.top_p}")
        if self.prompts not in PROMPTS:
            raise SliceGPTError(f"teacher prompts must be one of {', '.join(PROMPTS)}, got {self.prompts}")

    def sampling(self) -> dict:
        """Everything that decides the text but its length: a file is reused only if these match."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "tokens"}


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


@torch.no_grad()
def sample(model: nn.Module, prompts: torch.Tensor, new_tokens: int, temperature: float, top_p: float,
           generator: torch.Generator, stop: int | None) -> list[list[int]]:
    """Nucleus samples continuing each prompt row; each ends before its first `stop` token."""
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
        if stop is not None:
            finished |= token[:, 0] == stop
            if finished.all():
                break
        out = model(input_ids=token.to(device), use_cache=True, **{cache_name: cache})
        cache, logits = getattr(out, cache_name), out.logits[:, -1]
    rows = []
    for row in written.tolist():
        rows.append(row[:row.index(stop)] if stop is not None and stop in row else row)
    return rows


def write_teacher_text(model: nn.Module, tokenizer, path: Path, config: TeacherTextConfig, teacher: str,
                       opening_texts: list[str] | None = None, progress: bool = True) -> dict:
    """Make `path` hold at least `config.tokens` tokens of the teacher's text; a summary of what it holds.

    Resumes a file written before with the same settings; refuses one written with others.
    """
    path = Path(path)
    settings = {"teacher": str(teacher), **config.sampling()}
    sidecar = _sidecar(path)
    if sidecar.is_file():
        saved = json.loads(sidecar.read_text())["settings"]
        if saved != settings:
            changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
            raise SliceGPTError(f"{path} was written with other settings ({', '.join(changed)}); use the same "
                                f"settings, another path, or remove it and {sidecar.name}")
    elif path.exists() and path.stat().st_size > 0:
        raise SliceGPTError(f"{path} exists without its settings file {sidecar.name}; remove it or choose another path")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        sidecar.write_text(json.dumps({"settings": settings}, indent=1) + "\n")
    rows = _read_rows(path, config.batch_size)
    have = sum(r["tokens"] for r in rows)
    openings = _openings(tokenizer, opening_texts, config.opening_tokens) if config.prompts != "bos" else []
    if config.prompts == "openings" and not openings:
        raise SliceGPTError(f"teacher prompts 'openings' need calibration text with rows of at least "
                            f"{config.opening_tokens} tokens")
    was_training = model.training
    model.eval()
    bar = tqdm(total=config.tokens, initial=min(have, config.tokens), desc="Teacher writing", unit="tok",
               disable=not progress or have >= config.tokens)
    batch = len(rows) // config.batch_size
    while have < config.tokens:
        kind, prompts = _prompt(tokenizer, config, batch, openings)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + batch)
        written = sample(model, torch.tensor(prompts), config.sample_tokens, config.temperature, config.top_p,
                         generator, tokenizer.eos_token_id)
        new = [{"batch": batch, "prompt": kind, "tokens": len(ids),
                "text": tokenizer.decode(ids, skip_special_tokens=True)} for ids in written]
        with open(path, "a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in new))
            handle.flush()
            os.fsync(handle.fileno())
        rows += new
        added = sum(r["tokens"] for r in new)
        bar.update(min(added, config.tokens - have))
        have += added
        batch += 1
    bar.close()
    model.train(was_training)
    return summary(path, config.tokens)


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
