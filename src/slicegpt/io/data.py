"""Text sources for calibration and perplexity: the hub, or local JSONL/text files.

A source is either a path (a .jsonl file with a "text" field per row, or a plain text
file) or a hub dataset name. "wikitext2" is a short name for the hub's
`wikitext`/`wikitext-2-raw-v1`.

Every row's text must be a string: a missing, null or non-string "text" is refused, naming
the file and line (or the dataset and row), rather than read as "None" or a list's repr,
which calibration and perplexity would take for text. Blank strings are rows like any
other (WikiText has many).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from slicegpt.errors import BadType, SliceGPTError

HUB_ALIASES = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1"),
    "wikitext-2": ("wikitext", "wikitext-2-raw-v1"),
    "wikitext-2-raw-v1": ("wikitext", "wikitext-2-raw-v1"),
}


def looks_like_path(source: str) -> bool:
    return source.endswith((".jsonl", ".json", ".txt")) or "/" in source and Path(source).suffix != "" \
        or Path(source).exists()


def not_text(value) -> str | None:
    """Why `value` is not a row's text (None when it is one: any string, blank ones too)."""
    if isinstance(value, str):
        return None
    if value is None:
        return "null"
    kind = type(value).__name__
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} ({json.dumps(value, default=repr)[:40]})"


def check_texts(texts, name: str = "texts") -> None:
    """`texts` is a list of strings (the Python API's form of the rows a file gives)."""
    if isinstance(texts, (str, bytes)):
        raise BadType(f"{name} must be a list of strings, not one {type(texts).__name__}")
    for index, text in enumerate(texts):
        why = not_text(text)
        if why is not None:
            raise BadType(f"{name}[{index}] is {why}, not a string")


def read_local_texts(path: Path, field: str = "text") -> list[str]:
    if not path.is_file():
        raise SliceGPTError(f"data file not found: {path}")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise SliceGPTError(f"cannot read data file {path}: {error}") from None
    if path.suffix not in (".jsonl", ".json"):
        return [raw]
    texts = []
    # Lines as a JSONL reader counts them: splitlines() would also break at U+2028, which JSON
    # strings may hold unescaped, and number every later line wrongly.
    for number, line in enumerate(raw.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise SliceGPTError(f"{path}:{number} is not valid JSON") from None
        if not isinstance(row, dict) or field not in row:
            raise SliceGPTError(f"{path}:{number} has no '{field}' field")
        why = not_text(row[field])
        if why is not None:
            raise SliceGPTError(f"{path}:{number}: '{field}' is {why}, not a string")
        texts.append(row[field])
    return texts


def load_texts(source: str, split: str = "train", field: str = "text") -> list[str]:
    """The rows of a local file or a hub dataset split, as strings."""
    if looks_like_path(source):
        return read_local_texts(Path(source), field)
    name, config = HUB_ALIASES.get(source, (source, None))
    try:
        from datasets import load_dataset

        dataset = load_dataset(name, config, split=split)
    except Exception as error:  # the hub raises many kinds; the user needs the message
        raise SliceGPTError(f"cannot load dataset '{source}' (split {split}) from the hub: {error}") from None
    if field not in dataset.column_names:
        raise SliceGPTError(f"dataset '{source}' has no '{field}' column (columns: {dataset.column_names})")
    texts = list(dataset[field])
    for number, text in enumerate(texts, start=1):
        why = not_text(text)
        if why is not None:
            raise SliceGPTError(f"dataset '{source}' (split {split}), row {number}: '{field}' is {why}, not a string")
    return texts


def tokenize_joined(tokenizer, texts: list[str]) -> torch.Tensor:
    """One long token stream: rows joined by blank lines, no special tokens."""
    check_texts(texts)
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_batches(tokenizer, texts: list[str], samples: int, seqlen: int, batch_size: int,
                        seed: int) -> list[dict]:
    """`samples` distinct windows of `seqlen` tokens, drawn at random (seeded), in batches."""
    stream = tokenize_joined(tokenizer, texts)
    available = len(stream) // seqlen
    if available < samples:
        raise SliceGPTError(
            f"calibration data too short: {len(stream)} tokens make {available} windows of {seqlen}, "
            f"but {samples} were asked for (lower --cal-samples or --cal-seqlen, or give more text)"
        )
    starts = sorted(random.Random(seed).sample(range(available), samples))
    windows = torch.stack([stream[i * seqlen:(i + 1) * seqlen] for i in starts])
    return [
        {"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}
        for chunk in windows.split(batch_size)
    ]
