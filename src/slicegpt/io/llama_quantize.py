"""Quantize a GGUF file with llama.cpp's own quantizer, and check the widths first.

llama.cpp quantizes a matrix only when its row length is a multiple of the type's block
(32 for Q4_0/Q5_0/Q8_0, 256 for the K-quants); otherwise it silently stores another type
(Q4_K -> Q5_0, Q6_K -> Q8_0, a 32-block type -> F16). A sliced width is whatever slicing
left, so the rows are checked before quantizing and the misfits named with their widths.

The quantizer is the `llama-quantize` program (named with `quantizer`, else found on PATH),
which takes an importance matrix (`--imatrix`), or else llama.cpp's C function
`llama_model_quantize` reached through llama-cpp-python (in this interpreter or another one
named with `quantizer`), which is called here without one. bench/llama_cpp_tools.sh builds
llama-quantize from llama-cpp-python's source distribution.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

from slicegpt.errors import SliceGPTError

# Quantized file types offered (llama.cpp's names) -> the tensor type most matrices get.
QUANT_TYPES = {"Q8_0": "Q8_0", "Q6_K": "Q6_K", "Q5_0": "Q5_0", "Q5_K_M": "Q5_K", "Q5_K_S": "Q5_K",
               "Q4_0": "Q4_0", "Q4_K_M": "Q4_K", "Q4_K_S": "Q4_K", "Q3_K_M": "Q3_K", "Q2_K": "Q2_K"}
# llama.cpp's fallback for a 256-block type whose row length is not a multiple of 256.
K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "Q3_K": "Q4_0", "Q2_K": "Q4_0"}


def block_size(tensor_type: str) -> int:
    import gguf

    return gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, tensor_type)][0]


def check_quant_type(name: str) -> str:
    if name not in QUANT_TYPES:
        raise SliceGPTError(f"unknown quantization {name}; choose from {', '.join(QUANT_TYPES)}")
    return QUANT_TYPES[name]


def fallback_type(tensor_type: str, row_length: int) -> str:
    """What llama.cpp stores instead of `tensor_type` for rows of this length."""
    fallback = K_FALLBACK.get(tensor_type, "F16")
    return fallback if fallback != "F16" and row_length % block_size(fallback) == 0 else "F16"


def width_misfits(shapes: dict[str, tuple[int, ...]], quant: str) -> list[dict]:
    """Matrices whose rows do not fit `quant`'s block: name, row length, block, what llama.cpp stores."""
    tensor_type = check_quant_type(quant)
    block = block_size(tensor_type)
    misfits = []
    for name, shape in shapes.items():
        if len(shape) == 2 and shape[1] % block:
            misfits.append({"tensor": name, "row_length": shape[1], "block": block,
                            "stored_as": fallback_type(tensor_type, shape[1])})
    return misfits


def describe_misfits(misfits: list[dict], quant: str) -> str:
    lengths = sorted({m["row_length"] for m in misfits})
    stored = sorted({m["stored_as"] for m in misfits})
    block = misfits[0]["block"]
    return (f"{len(misfits)} matrices have rows of {', '.join(map(str, lengths))} values, not a multiple of "
            f"{block}: llama.cpp would store them as {'/'.join(stored)} instead of {quant} "
            f"(slice with --round-to {block} for widths that fit)")


QUANTIZE_SCRIPT = """
import sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = int(sys.argv[3])
params.nthread = int(sys.argv[4])
status = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params)
sys.exit(1 if status else 0)
"""


def find_quantizer(quantizer: str | None) -> list[str]:
    """`llama-quantize`, or the command that runs `QUANTIZE_SCRIPT`-style arguments."""
    if quantizer:
        path = shutil.which(quantizer) or quantizer
        if not Path(path).is_file():
            raise SliceGPTError(f"quantizer not found: {quantizer}")
        return [path] if is_llama_quantize(path) else [path, "-c", QUANTIZE_SCRIPT]
    if shutil.which("llama-quantize"):
        return [shutil.which("llama-quantize")]
    if importlib.util.find_spec("llama_cpp") is not None:
        return [sys.executable, "-c", QUANTIZE_SCRIPT]
    raise SliceGPTError("quantized GGUF output needs llama.cpp's quantizer: install llama-cpp-python, put "
                        "llama-quantize on PATH, or pass --quantizer (a llama-quantize program or a Python "
                        "that has llama_cpp)")


def is_llama_quantize(path: str) -> bool:
    return Path(path).name.startswith("llama-quantize")


def quantizer_name(quantizer: str | None = None) -> str:
    """Which quantizer `quantize_gguf` would run: "llama-quantize (PATH)" or "llama-cpp-python (PYTHON)"."""
    command = find_quantizer(quantizer)
    kind = "llama-quantize" if is_llama_quantize(command[0]) else "llama-cpp-python"
    return f"{kind} ({command[0]})"


def takes_imatrix(quantizer: str | None = None) -> bool:
    """Whether the quantizer found can be given an importance matrix (llama-quantize can)."""
    return is_llama_quantize(find_quantizer(quantizer)[0])


def quantize_gguf(source: Path, target: Path, quant: str, quantizer: str | None = None, threads: int = 2,
                  imatrix: Path | None = None) -> Path:
    """llama.cpp's quantizer: source GGUF -> target GGUF of file type `quant` (e.g. Q8_0, Q4_K_M),
    weighted by the GGUF importance matrix `imatrix` where given (llama-quantize only)."""
    return quantize_with_log(source, target, quant, quantizer, threads, imatrix)["out"]


def quantize_with_log(source: Path, target: Path, quant: str, quantizer: str | None = None, threads: int = 2,
                      imatrix: Path | None = None) -> dict:
    """As `quantize_gguf`; returns the target ("out"), the quantizer that ran, and the quantized
    tensors the importance matrix had nothing for ("without_importance")."""
    import gguf

    check_quant_type(quant)
    command = find_quantizer(quantizer)
    file_type = gguf.LlamaFileType[f"MOSTLY_{quant}"].value
    if command[-2:] == ["-c", QUANTIZE_SCRIPT]:
        if imatrix is not None:
            raise SliceGPTError("llama-cpp-python's quantize function is called without an importance matrix: "
                                "use llama-quantize (bench/llama_cpp_tools.sh builds it) or --no-imatrix")
        args = command + [str(source), str(target), str(file_type), str(threads)]
    else:
        args = command + (["--imatrix", str(imatrix)] if imatrix is not None else []) + [
            str(source), str(target), quant, str(threads)]
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0 or not target.is_file():
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise SliceGPTError(f"llama.cpp's quantizer failed ({' '.join(args[:1])}): {' | '.join(tail)}")
    log = result.stdout + result.stderr
    missing = [line.split("did not find weights for", 1)[1].strip() for line in log.splitlines()
               if "did not find weights for" in line]
    kind = "llama-quantize" if is_llama_quantize(command[0]) else "llama-cpp-python"
    return {"out": target, "quantizer": f"{kind} ({command[0]})", "without_importance": missing}
