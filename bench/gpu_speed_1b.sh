#!/usr/bin/env bash
# Dense vs sliced speed at a size where weight bandwidth could matter: a Llama of TinyLlama-1.1B's
# shape (hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV heads, untied head) with RANDOM
# weights and SmolLM2's 49152-token vocabulary, bfloat16, on one CUDA GPU of a BARE machine.
# Needs the ignored .gpu/ of bench/gpu_prepare.sh (snapshot, tokenizer, WikiText-2, wheels),
# carried along. On the GPU machine, from the repository root:
#     OUT=/some/dir bash bench/gpu_speed_1b.sh
# Steps, each capped with `timeout` and all together by DEADLINE seconds (a failed step is
# reported and the next still runs): install wheels, build the random model (bench/gpu_speed_1b.py
# build), slice it one at a time (clean slice times) at 25% with the default block rotations,
# with `--rotations model --plain`, and with `--rotations model --target-ratio 0.85`, then time all
# four in one process in lock step (slicegpt.evaluation.benchmark; bench/gpu_speed_1b.py bench).
# Writes $OUT/{gpu_speed_1b.log,speed_cuda_1b.json,slice_*.log}.
# CPU rehearsal (tiny shape and settings):
#     PY=.venv/bin/python DEVICE=cpu WHEELS= SHAPE="--hidden 256 --intermediate 512 --layers 2 --heads 8 --kv-heads 2" \
#     BATCHES=1,2 REPEATS=1 NEW_TOKENS=4 PROMPT_LEN=16 OUT=/tmp/gpu-1b-rehearsal nice -n 19 bash bench/gpu_speed_1b.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/slicegpt-gpu-1b-out}
mkdir -p "$OUT"
if [ -z "${_GPU_1B_LOGGED:-}" ]; then
    _GPU_1B_LOGGED=1 bash "$0" "$@" 2>&1 | tee "$OUT/gpu_speed_1b.log"
    exit "${PIPESTATUS[0]}"
fi

PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
SNAP=${SNAP:-.gpu/snapshot}
WORK=${WORK:-/tmp/slicegpt-gpu-1b}
WHEELS=${WHEELS-.gpu/wheels/*.whl}
SHAPE=${SHAPE:-}
BATCHES=${BATCHES:-1,8,32}
REPEATS=${REPEATS:-5}
NEW_TOKENS=${NEW_TOKENS:-32}
PROMPT_LEN=${PROMPT_LEN:-128}
CAL="--cal-data .gpu/shared/data/wikitext-2/wikitext-2-v1.validation.jsonl --cal-samples 8 --cal-seqlen 256 --cal-batch-size 8"
DEADLINE=${DEADLINE:-300}
export SLICEGPT_CACHE=$WORK/cache PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
status=0

source bench/gpu_common.sh

echo "== snapshot $(cat "$SNAP/COMMIT" 2>/dev/null); $(uname -m); $(nproc) CPUs; python $PY"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem,clocks.max.sm --format=csv
rm -rf "$WORK" && mkdir -p "$WORK/pydeps"
if [ -n "$WHEELS" ]; then
    step 60 "wheels" $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/pydeps" $WHEELS
fi
export PYTHONPATH=$SNAP/src:$WORK/pydeps
$PY -c "import torch, transformers, slicegpt; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, slicegpt.__file__)"

step 90 "random model" $PY bench/gpu_speed_1b.py build "$WORK/dense" --device "$DEVICE" --dtype "$DTYPE" $SHAPE

slice() {  # slice NAME FLAGS...
    local name=$1
    shift
    step 75 "slice $name" bash -c "$PY -m slicegpt.cli slice $WORK/dense --out $WORK/$name --overwrite --no-streaming \
        $CAL --device $DEVICE --dtype $DTYPE $* > $OUT/slice_$name.log 2>&1; rc=\$?; tail -n 25 $OUT/slice_$name.log; exit \$rc"
    [ -f "$WORK/$name/slicing_report.json" ] && $PY -c "import json,sys; r=json.load(open(sys.argv[1])); \
print('   params', r['params'], 'timings_s', r['timings_s'], 'widths', str(r['widths'])[:300])" \
        "$WORK/$name/slicing_report.json"
}
slice block25 --sparsity 0.25
slice model25plain --sparsity 0.25 --rotations model --plain
slice model_r085 --target-ratio 0.85 --rotations model

step 170 "speed" $PY bench/gpu_speed_1b.py bench --dense "$WORK/dense" \
    --sliced "25% block=$WORK/block25" "25% model plain=$WORK/model25plain" "model r0.85=$WORK/model_r085" \
    --out "$OUT/speed_cuda_1b.json" --device "$DEVICE" --dtype "$DTYPE" --batch-sizes "$BATCHES" \
    --repeats "$REPEATS" --new-tokens "$NEW_TOKENS" --prompt-len "$PROMPT_LEN"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=memory.used,clocks.sm,temperature.gpu --format=csv
echo "== done in ${SECONDS}s, status $status"
exit $status
