#!/usr/bin/env bash
# Speed and cost benchmarks on one CUDA GPU, on a BARE machine (no network, no `make setup`),
# in about 3.5 minutes (202 s on one H200, 2026-11). First, here: `bash bench/gpu_prepare.sh` (fills the ignored .gpu/: code
# snapshot, SmolLM2-135M config + tokenizer, WikiText-2 files, wheels). Then, on the GPU
# machine, from the repository root, with .gpu/ carried along:
#     OUT=/some/dir bash bench/gpu_check.sh
# It prints torch/CUDA/GPU info, installs the carried wheels into $WORK/pydeps, builds a model
# of SmolLM2-135M's exact shape with RANDOM weights (seed 0) as the cache entry 'smollm2-135m',
# slices it (in parallel), runs bench/speed.py (dense vs 20/25/30% sliced + the 25% variants,
# batch 1 and 8, KV cache) and protocol P's cost measurement (calibrate-and-slice time / one
# dense forward over the same 64 x 2048 tokens, at 25%, twice). Speed and cost do not depend on
# the weight values; the perplexities of a random model mean nothing.
# Writes $OUT/{gpu_check.log,gpu_env.json,speed_cuda.json,protocol_p_cuda.json}. Each step is
# capped with `timeout`, and all of them together by DEADLINE seconds; a failed step is
# reported and the next one still runs.
# A CPU rehearsal with tiny settings (what was run before spending GPU time):
#     PY=.venv/bin/python DEVICE=cpu THREADS=2 JOBS=1 SPARSITIES=0.25 VARIANTS= REPEATS=1 \
#     SPEED_ARGS="--batch-sizes 1 --new-tokens 4 --no-ablation" P_ARGS="--quick" P_SPARSITIES=0.25 \
#     WHEELS=".gpu/wheels/transformers-*.whl" OUT=/tmp/gpu-rehearsal bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/slicegpt-gpu-out}
mkdir -p "$OUT"
if [ -z "${_GPU_CHECK_LOGGED:-}" ]; then  # run again with everything logged to $OUT
    _GPU_CHECK_LOGGED=1 bash "$0" "$@" 2>&1 | tee "$OUT/gpu_check.log"
    exit "${PIPESTATUS[0]}"
fi

PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
THREADS=${THREADS:-0}
SNAP=${SNAP:-.gpu/snapshot}
WORK=${WORK:-/tmp/slicegpt-gpu}
WHEELS=${WHEELS:-.gpu/wheels/*.whl}
SPARSITIES=${SPARSITIES:-0.2,0.25,0.3}
VARIANTS=${VARIANTS-layer,model}
REPEATS=${REPEATS:-5}
SPEED_ARGS=${SPEED_ARGS:-}
P_ARGS=${P_ARGS:-}
P_SPARSITIES=${P_SPARSITIES:-0.25,0.25}
JOBS=${JOBS:-6}
DEADLINE=${DEADLINE:-370}
export SLICEGPT_CACHE=$WORK/cache PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
status=0

source bench/gpu_common.sh

echo "== snapshot $(cat "$SNAP/COMMIT" 2>/dev/null); $(uname -m); $(nproc) CPUs; python $PY"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
rm -rf "$WORK" && mkdir -p "$WORK/pydeps"
step 60 "wheels" $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/pydeps" $WHEELS
export PYTHONPATH=$SNAP/src:$WORK/pydeps

step 60 "environment" $PY - "$DEVICE" "$OUT/gpu_env.json" <<'PY'
import json, os, sys, importlib.metadata as md
import torch, transformers, slicegpt
device, out = sys.argv[1:3]
env = {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
       "transformers_file": transformers.__file__, "slicegpt_file": slicegpt.__file__, "cpus": os.cpu_count()}
for package in ("tokenizers", "huggingface-hub", "safetensors", "accelerate", "regex", "numpy"):
    try:
        env[package] = md.version(package)
    except md.PackageNotFoundError:
        env[package] = None
if device.startswith("cuda"):
    assert torch.cuda.is_available(), f"no CUDA device visible to torch {torch.__version__}"
    p = torch.cuda.get_device_properties(0)
    env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
               multiprocessors=p.multi_processor_count, cudnn=torch.backends.cudnn.version())
print(json.dumps(env, indent=1))
open(out, "w").write(json.dumps(env, indent=2) + "\n")
PY

# A model of SmolLM2-135M's shape with random weights, where resolve('smollm2-135m') looks.
step 90 "random model" $PY - .gpu/model "$SLICEGPT_CACHE/smollm2-135m" <<'PY'
import json, shutil, sys, time
from pathlib import Path
import torch
from transformers import AutoConfig, AutoModelForCausalLM
source, target = Path(sys.argv[1]), Path(sys.argv[2])
start = time.perf_counter()
torch.manual_seed(0)
config = AutoConfig.from_pretrained(source)
model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
target.mkdir(parents=True, exist_ok=True)
for f in source.iterdir():
    shutil.copy(f, target / f.name)
model.save_pretrained(target)
(target / "source.json").write_text(json.dumps({"random_init": {"seed": 0, "config": str(source)}}))
n = sum(p.numel() for p in model.parameters())
print(f"random {config.model_type} {n / 1e6:.2f}M parameters, {config.num_hidden_layers} layers, "
      f"hidden {config.hidden_size}, in {time.perf_counter() - start:.1f} s -> {target}")
PY

# Slice the speed benchmark's models in parallel, exactly as bench/speed.py would (it then finds them).
step 120 "slice for speed" $PY - "$SNAP/bench" "$WORK/speed" "$DEVICE" "$SPARSITIES" "$VARIANTS" "$JOBS" <<'PY'
import sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
bench, scratch, device, sparsities, variants, jobs = sys.argv[1:7]
sys.path.insert(0, bench)
from speed import make_sliced
todo = [(float(s), "") for s in sparsities.split(",")] + [(0.25, f" {v}") for v in variants.split(",") if v]
start = time.perf_counter()
with ThreadPoolExecutor(int(jobs)) as pool:
    for path in pool.map(lambda job: make_sliced(job[0], Path(scratch), device, job[1]), todo):
        print(f"{time.perf_counter() - start:6.1f} s  {path}", flush=True)
PY

step 150 "speed" $PY "$SNAP/bench/speed.py" --device "$DEVICE" --threads "$THREADS" --repeats "$REPEATS" \
    --sparsities "$SPARSITIES" --variants "$VARIANTS" --scratch "$WORK/speed" --out "$OUT/speed_$DEVICE.json" $SPEED_ARGS

# Protocol P's cost at 25% (twice, each in its own process; the first row is the summary's).
touch "$WORK/marker"
step 150 "protocol P" $PY "$SNAP/bench/protocol_p.py" --device "$DEVICE" --sparsities "$P_SPARSITIES" $P_ARGS
for f in $(find "$SNAP/bench/results" -name 'protocol_p*.json' -newer "$WORK/marker"); do
    cp "$f" "$OUT/$(basename "$f")" && echo "copied $f to $OUT"
done
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=memory.used,clocks.sm,temperature.gpu --format=csv
echo "== done in ${SECONDS}s, status $status"
exit $status
