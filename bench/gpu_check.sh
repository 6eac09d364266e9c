#!/usr/bin/env bash
# Speed and cost benchmarks on one CUDA GPU, in under 5 minutes. NOT RUN YET: no session so
# far has had a GPU (see bench/README.md). Usage, from the repository root of a checkout set
# up with `make setup` (on a GPU machine pip's torch==2.13.0 wheel is the CUDA build):
#     bash bench/gpu_check.sh            # writes bench/results/{speed_cuda,protocol_p_cuda}.json
# Steps are capped with `timeout` so a hang cannot eat the machine's time; a failed step is
# reported and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SCRATCH=${SCRATCH:-/tmp/slicegpt-gpu}
status=0

step() {  # step SECONDS NAME COMMAND...
    local limit=$1 name=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    [ $rc -eq 0 ] || status=1
}

$PY - <<'PY' || exit 1
import torch
assert torch.cuda.is_available(), f"no CUDA device visible to torch {torch.__version__}"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}, "
      f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
PY
# The embedded model must resolve (converted once into ~/.cache/slicegpt).
step 45 "model" $PY -c "from slicegpt.models import resolve; print(resolve('smollm2-135m'))"
# Speed: dense vs 20/25/30% sliced (+ the 25% model with fast paths off), batch 1 and 8, KV cache.
step 150 "speed" $PY bench/speed.py --device cuda --threads 0 --repeats 5 --scratch "$SCRATCH/speed" \
    --out bench/results/speed_cuda.json
# Cost: protocol P (calibrate-and-slice time / one dense forward over the same tokens); target <= 1.3.
step 140 "protocol P" $PY bench/protocol_p.py --device cuda
exit $status
