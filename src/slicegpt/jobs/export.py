"""The export job: a slice with one basis for the whole model as a plain directory or a GGUF file.

A sliced checkpoint without shortcuts is a standard model of its own class with a smaller
hidden size (architectures/plain.py). `plain` writes that as a Hugging Face directory that
needs no remote code; `gguf` writes it (or any plain Llama/Mistral/Qwen2/Qwen3 directory,
dense ones included) as one GGUF file for llama.cpp, optionally quantized by llama.cpp's
own quantizer. A tied head has no place for its map in a plain class, so the export
unties it and says what that costs. `export` runs it from an `ExportConfig`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from slicegpt.architectures.families import family_of_sliced
from slicegpt.architectures.plain import to_plain_model
from slicegpt.errors import SliceGPTError
from slicegpt.io.checkpoint import CARD_FILE, REPORT_FILE, atomic_directory, write_sliced
from slicegpt.io.gguf_export import write_gguf
from slicegpt.io.imatrix import imatrix_path_for, write_imatrix
from slicegpt.io.importance_file import IMPORTANCE_FILE, carried_importance, importance_path, read_importance
from slicegpt.io.llama_quantize import describe_misfits, quantize_with_log, takes_imatrix, width_misfits
from slicegpt.io.models import EMBEDDED, SOURCE_FILE, cache_dir, load_model
from slicegpt.jobs.progress import say
from slicegpt.sizing.counts import count_parameters


def plain_model(directory: str | Path, dtype: str = "float32"):
    """(plain model, tokenizer, note): the checkpoint in `directory` as a model of its original class.

    `note` says what untying a tied head cost, or is None when nothing was untied.
    """
    model, tokenizer = load_model(str(directory), dtype=dtype)
    slicing = getattr(model.config, "slicing", None)
    if slicing is None:
        return model, tokenizer, None
    family = family_of_sliced(model)
    before = count_parameters(model)
    plain = to_plain_model(model, family)
    after = count_parameters(plain)
    note = None
    if slicing.get("tied_head"):
        note = (f"The tied head is untied: a plain {slicing['base_architecture']} has no place for the map after the "
                f"final norm, so the head gets its own matrix (vocab {plain.config.vocab_size} x width "
                f"{plain.config.hidden_size}): {before:,} -> {after:,} parameters (+{after - before:,}).")
    return plain, tokenizer, note


def source_gguf(directory: Path) -> Path | None:
    """The GGUF file a model directory (or the base of a sliced one) was converted from, if any."""
    candidates = [directory / SOURCE_FILE]
    report = directory / REPORT_FILE
    if report.is_file():
        base = json.loads(report.read_text()).get("config", {}).get("model")
        if base in EMBEDDED:
            candidates.append(cache_dir() / base / SOURCE_FILE)
        elif base and base.endswith(".gguf") and Path(base).is_file():
            return Path(base)
        elif base:
            candidates.append(Path(base) / SOURCE_FILE)
    for candidate in candidates:
        if candidate.is_file():
            path = Path(json.loads(candidate.read_text()).get("gguf", ""))
            if path.is_file():
                return path
    return None


def tokenizer_pre_from(directory: Path) -> str | None:
    """llama.cpp's pre-tokenizer name recorded in the GGUF file the model came from."""
    import gguf

    path = source_gguf(directory)
    if path is None:
        return None
    field = gguf.GGUFReader(path).fields.get("tokenizer.ggml.pre")
    return field.contents() if field is not None else None


def export_plain(directory: str | Path, out: str | Path, overwrite: bool = False,
                 dtype: str = "float32") -> tuple[Path, str | None]:
    """Write the sliced checkpoint as a plain Hugging Face directory (no remote code)."""
    directory = Path(directory)
    model, tokenizer, note = plain_model(directory, dtype)
    if note is None and getattr(model.config, "slicing", None) is None and not (directory / REPORT_FILE).is_file():
        raise SliceGPTError(f"{directory} is not a sliced checkpoint; it is a plain model already")
    card = (directory / CARD_FILE).read_text() if (directory / CARD_FILE).is_file() else "# Sliced model\n"
    card += ("\n## Plain export\n\nThis directory holds a plain "
             f"`{type(model).__name__}` (hidden size {model.config.hidden_size}, no remote code), exported with "
             "`slicegpt export --format plain`. RMSNorm scales and epsilon are set so that a standard norm over "
             "the sliced width equals the sliced model's norm. " + (note or "") + "\n")
    extras = {CARD_FILE: card, **carried_importance(directory)}
    if (directory / REPORT_FILE).is_file():
        report = json.loads((directory / REPORT_FILE).read_text())
        report["export"] = {"format": "plain", "untied_head": note is not None,
                            "params": count_parameters(model), "note": note}
        extras[REPORT_FILE] = json.dumps(report, indent=2) + "\n"

    atomic_directory(Path(out), overwrite, lambda tmp: write_sliced(model, tokenizer, tmp, extras))
    return Path(out), note


def staged(path: Path) -> Path:
    """The temporary name beside `path` that a file is written under until the export succeeds."""
    return path.with_name(f".{path.name}.partial")


def writes_slice_imatrix(directory: Path, imatrix: str | None, use_imatrix: bool) -> bool:
    """Whether the export writes the slice's own importance matrix beside its output."""
    return use_imatrix and imatrix is None and importance_path(directory) is not None


def write_slice_imatrix(directory: Path, out: Path, transform=None) -> Path | None:
    """The slice's own importance (IMPORTANCE_FILE) as llama.cpp's imatrix file at `out` (through
    `transform`, where the weights were rotated again); None if it has none."""
    source = importance_path(directory)
    if source is None:
        return None
    importance, tokens = read_importance(source)
    if transform is not None:
        importance = transform(importance)
    config = {}
    if (directory / REPORT_FILE).is_file():
        config = json.loads((directory / REPORT_FILE).read_text()).get("config", {})
    dataset = f"slicegpt calibration: {config.get('cal_data', 'unknown')}"
    return write_imatrix(importance, tokens, out, dataset=dataset, chunk_size=int(config.get("cal_seqlen", 2048)))


def choose_imatrix(directory: Path, out: Path, quant: str | None, imatrix: str | None, use_imatrix: bool,
                   quantizer: str | None, warn, transform=None) -> tuple[Path | None, str | None]:
    """(the importance matrix to quantize with, where it came from): `imatrix` (a file from
    llama-imatrix), else the slice's own, written under the staged name of its place beside
    `out` (the export renames it there once it succeeds); None where there is none or the
    quantizer cannot take one (said through `warn`)."""
    if not use_imatrix:
        return None, None
    if imatrix is not None:
        path, source = Path(imatrix), "file"
        if not path.is_file():
            raise SliceGPTError(f"importance matrix not found: {imatrix}")
    else:
        path, source = write_slice_imatrix(directory, staged(imatrix_path_for(out)), transform), "slicegpt"
        if path is None:
            if quant:
                warn(f"note: {directory} holds no {IMPORTANCE_FILE} (slice it with this version, or pass --imatrix "
                     "FILE from llama-imatrix): quantizing without an importance matrix")
            return None, None
    if quant and not takes_imatrix(quantizer):
        name = imatrix_path_for(out).name if source == "slicegpt" else path.name
        warn("note: the quantizer found is llama-cpp-python's quantize function, which is called without an "
             f"importance matrix: quantizing without {name} (llama-quantize takes it; "
             "bench/llama_cpp_tools.sh builds one)")
        return None, None
    return path, source


def export_gguf(directory: str | Path, out: str | Path, out_type: str = "f16", quant: str | None = None,
                quantizer: str | None = None, allow_fallback: bool = False, tokenizer_pre: str | None = None,
                overwrite: bool = False, threads: int = 2, dtype: str = "float32", warn=print,
                imatrix: str | None = None, use_imatrix: bool = True, rotate: str = "none",
                rotate_seed: int = 0) -> dict:
    """Write the checkpoint as a GGUF file (quantized with llama.cpp's quantizer when `quant` is given).

    The slice's importance (IMPORTANCE_FILE, kept by the slicing run) is written beside the file as
    llama.cpp's imatrix (model.imatrix.gguf) and weighs the quantization, unless `use_imatrix` is
    off or `imatrix` names another imatrix file (from llama-imatrix). Like the model, it replaces
    an existing file only with `overwrite`, and appears only once the export has succeeded. `rotate` (auto, hadamard,
    random) folds one more orthogonal rotation of the stream into the weights first
    (method/extra_rotation.py)."""
    directory, out = Path(directory), Path(out)
    if out.suffix != ".gguf":
        raise SliceGPTError(f"the GGUF output should end in .gguf, not {out.name}")
    sidecar = imatrix_path_for(out)
    for target in (out, sidecar) if writes_slice_imatrix(directory, imatrix, use_imatrix) else (out,):
        if target.exists() and not overwrite:
            raise SliceGPTError(f"{target} exists (use --overwrite to replace it)")
    model, tokenizer, note = plain_model(directory, dtype)
    if note:
        warn(note)
    transform, rotation = None, None
    if rotate != "none":
        from slicegpt.method.extra_rotation import extra_rotation, plain_family, rotate_importance, rotate_plain_model

        family = plain_family(model)
        R, rotation = extra_rotation(model.config.hidden_size, rotate_seed, rotate)
        rotate_plain_model(model, family, R)
        transform = lambda importance: rotate_importance(importance, model, family, R)  # noqa: E731
    misfits = []
    if quant:
        shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        misfits = width_misfits(shapes, quant)
        if misfits and not allow_fallback:
            raise SliceGPTError(describe_misfits(misfits, quant) + "; --allow-fallback exports anyway")
        if misfits:
            warn("warning: " + describe_misfits(misfits, quant))
    pre = tokenizer_pre or tokenizer_pre_from(directory)
    if pre is None:
        pre = "default"
        warn("warning: llama.cpp's pre-tokenizer name is unknown for this tokenizer; writing 'default' "
             "(pass --tokenizer-pre NAME, e.g. the one convert_hf_to_gguf.py picks for the base model)")
    name = directory.resolve().name
    out.parent.mkdir(parents=True, exist_ok=True)
    quantized = {}
    unquantized = out.with_name(f".{out.stem}.{out_type}.gguf")
    try:
        imatrix_file, imatrix_source = choose_imatrix(directory, out, quant, imatrix, use_imatrix, quantizer, warn,
                                                      transform)
        if quant is None:
            write_gguf(model, tokenizer, out, out_type, name=name, tokenizer_pre=pre, description=note)
        else:
            write_gguf(model, tokenizer, unquantized, out_type, name=name, tokenizer_pre=pre, description=note)
            quantized = quantize_with_log(unquantized, staged(out), quant, quantizer, threads, imatrix_file)
            shutil.move(staged(out), out)
        if staged(sidecar).exists():  # the slice's own matrix, published with the model it belongs to
            staged(sidecar).replace(sidecar)
        if imatrix_source == "slicegpt":
            imatrix_file = sidecar
    finally:
        for leftover in (unquantized, staged(out), staged(sidecar)):
            leftover.unlink(missing_ok=True)
    return {"out": str(out), "bytes": out.stat().st_size, "type": quant or out_type.upper(),
            "params": count_parameters(model), "hidden_size": model.config.hidden_size,
            "tokenizer_pre": pre, "untied_head_note": note, "fallbacks": misfits,
            "quantizer": quantized.get("quantizer"),
            "imatrix": str(imatrix_file) if imatrix_file is not None else None, "imatrix_source": imatrix_source,
            "without_importance": quantized.get("without_importance", []),
            "extra_rotation": None if rotation is None else {"kind": rotation, "seed": rotate_seed}}


@dataclass
class ExportConfig:
    """One export: the directory `model` written to `out` as `format` ("plain" or "gguf"). The
    rest are the GGUF file's settings (see export_gguf); `dtype` is what the model is loaded and
    converted in."""

    model: str
    out: str
    format: str
    out_type: str = "f16"
    quantize: str | None = None
    quantizer: str | None = None
    imatrix: str | None = None
    use_imatrix: bool = True
    rotate: str = "none"
    rotate_seed: int = 0
    allow_fallback: bool = False
    tokenizer_pre: str | None = None
    dtype: str = "float32"
    threads: int = 2
    overwrite: bool = False


def export(config: ExportConfig, warn=say) -> dict:
    """Run one export; the result names what was written (what `slicegpt export --json` prints).
    Notes and warnings go through `warn`."""
    if config.format == "plain":
        if config.quantize:
            raise SliceGPTError("--quantize needs --format gguf")
        out, note = export_plain(config.model, config.out, overwrite=config.overwrite, dtype=config.dtype)
        if note:
            warn(note)
        return {"out": str(out), "format": "plain", "untied_head_note": note}
    if config.format != "gguf":
        raise SliceGPTError(f"the export format is plain or gguf, not {config.format!r}")
    result = export_gguf(config.model, config.out, out_type=config.out_type, quant=config.quantize,
                         quantizer=config.quantizer, allow_fallback=config.allow_fallback,
                         tokenizer_pre=config.tokenizer_pre, overwrite=config.overwrite, threads=config.threads,
                         dtype=config.dtype, warn=warn, imatrix=config.imatrix, use_imatrix=config.use_imatrix,
                         rotate=config.rotate, rotate_seed=config.rotate_seed)
    return {**result, "format": "gguf"}
