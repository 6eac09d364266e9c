"""Save sliced models as standard Hugging Face directories, and load them back.

The directory holds safetensors weights, config.json (with `slicing`, which records
every width, and an `auto_map` pointing at the bundled modeling file), the tokenizer,
and modeling_sliced.py, so `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)` works where slicegpt is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from slicegpt.architectures import modeling_sliced
from slicegpt.errors import SliceGPTError
from slicegpt.io.model_card import model_card
from slicegpt.io.permissions import ordinary_permissions

MODELING_FILE = "modeling_sliced.py"
REPORT_FILE = "slicing_report.json"
CARD_FILE = "README.md"


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse early, before any work, to clobber a directory that holds something."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise SliceGPTError(f"output directory {out} exists and is not empty (use --overwrite to replace it)")


def modeling_source(base_architecture: str) -> str:
    source = Path(modeling_sliced.__file__).read_text()
    return source + (
        "\n\n# The class this checkpoint's config.json names in auto_map.\n"
        f"from transformers import {base_architecture} as _Base  # noqa: E402\n\n"
        "SlicedForCausalLM = sliced_class_for(_Base)\n"
    )


def atomic_directory(out: Path, overwrite: bool, write) -> None:
    """Call write(tmp_dir), then move tmp_dir to `out`: no half-written output is ever left."""
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        write(tmp)
        ordinary_permissions(tmp)  # mkdtemp and safetensors make theirs private; an output is shared
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def atomic_file(path: str | Path, content: str | bytes) -> Path:
    """Write `path` through a temporary file beside it, renamed into place: a reader sees the old
    file or the new one, never half of one, and a failed write leaves the old file as it was."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(content if isinstance(content, bytes) else content.encode())
        ordinary_permissions(Path(tmp))  # mkstemp makes it private; an output is shared
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None and os.path.lexists(tmp):
            os.unlink(tmp)
        if isinstance(error, OSError):
            kept = " (the earlier file is kept)" if path.exists() else ""
            raise SliceGPTError(f"cannot write {path}: {error.strerror or error}{kept}") from None
        raise
    return path


AUTO_MAP = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.SlicedForCausalLM"}


def sliced_architecture(slicing: dict) -> str:
    """The architecture a sliced directory's config.json names: not the base class, whose code
    cannot run it, but the name of the class its modeling file builds. Serving engines pick
    their model by this name (slicegpt's vLLM plugin registers `Sliced<Base>`)."""
    return f"Sliced{slicing['base_architecture']}"


def name_sliced_architecture(directory: Path, slicing: dict) -> None:
    """save_pretrained writes the in-memory class's name; a sliced directory names its own."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config["architectures"] = [sliced_architecture(slicing)]
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_sliced(model: nn.Module, tokenizer, directory: Path, extra_files: dict[str, str | bytes] | None = None) -> None:
    """Write a sliced model into an existing directory, with its modeling file where it needs one.

    A plain export (see plain.py) has no `config.slicing` and needs no remote code.
    """
    if getattr(model.config, "slicing", None) is None:
        model.save_pretrained(directory, safe_serialization=True)
    else:
        model.config.auto_map = AUTO_MAP
        # Keys exactly as in memory: transformers' "original format" conversions (fused experts
        # split per expert, renamed heads) are skipped on load for remote-code classes, so
        # reverting them on save would leave keys that nothing maps back.
        model.save_pretrained(directory, safe_serialization=True, save_original_format=False)
        name_sliced_architecture(directory, model.config.slicing)
    write_companion_files(model.config, tokenizer, directory, extra_files)


def write_companion_files(config, tokenizer, directory: Path, extra_files: dict[str, str | bytes] | None = None) -> None:
    """Everything of a sliced directory but the weights and config: tokenizer, modeling file, extras."""
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    slicing = getattr(config, "slicing", None)
    if slicing is not None:
        (directory / MODELING_FILE).write_text(modeling_source(slicing["base_architecture"]))
    for name, content in (extra_files or {}).items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)  # e.g. importance/
        if isinstance(content, bytes):
            (directory / name).write_bytes(content)
        else:
            (directory / name).write_text(content)


def save_sliced(model: nn.Module, tokenizer, out: str | Path, report: dict | None = None,
                overwrite: bool = False, extra_files: dict[str, str | bytes] | None = None) -> Path:
    """Write a sliced model atomically into `out`, with its report, a model card written from the
    report (unless `extra_files` brings its own README.md), and any extra files (text or bytes)."""
    out = Path(out)
    files = dict(extra_files or {})
    if report is not None:

        files[REPORT_FILE] = json.dumps(report, indent=2) + "\n"
        files.setdefault(CARD_FILE, model_card(report))
    atomic_directory(out, overwrite, lambda tmp: write_sliced(model, tokenizer, tmp, files))
    return out


def load_sliced(directory: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
                **from_pretrained_kwargs) -> nn.Module:
    """Load a sliced checkpoint with slicegpt's own copy of the modeling code.

    Extra keyword arguments go to `from_pretrained` (e.g. attn_implementation="eager").
    """
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory)
    slicing = getattr(config, "slicing", None)
    if slicing is None:
        raise SliceGPTError(f"{directory} is not a sliced checkpoint (config.json has no 'slicing')")
    base = getattr(transformers, slicing["base_architecture"], None)
    if base is None:
        raise SliceGPTError(f"this transformers has no {slicing['base_architecture']}")
    cls = modeling_sliced.sliced_class_for(base)
    return cls.from_pretrained(directory, config=config, dtype=dtype, **from_pretrained_kwargs).to(device).eval()
