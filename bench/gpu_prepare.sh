#!/usr/bin/env bash
# Prepare the ignored folder .gpu/ that bench/gpu_check.sh needs on a BARE CUDA machine (no
# network, no `make setup`, no project install). Run here, on a machine set up with
# `make setup`, from the repository root:
#     bash bench/gpu_prepare.sh            # snapshot of HEAD's src/ and bench/
#     SNAPSHOT_FROM=worktree bash bench/gpu_prepare.sh   # snapshot of the working tree instead
# .gpu/ then holds (about 21 MB, well inside a 64 MiB transfer):
#   snapshot/      src/ and bench/ as committed (code edited meanwhile does not leak in)
#   model/         SmolLM2-135M's config and tokenizer files only: no weights (517 MB). The GPU
#                  machine builds a model of the same shape with random weights (seed 0); speed
#                  and calibration cost do not depend on the weight values, quality does.
#   shared/data/   the two WikiText-2 files the benchmarks read, laid out so that the snapshot's
#                  scripts (ROOT.parent / "shared" / "data") find them: ROOT is .gpu/snapshot.
#   wheels/        packages the GPU image lacks or has too old: transformers (the image has 5.17,
#                  we need >=5.20) and regex (transformers checks its version at import).
# `datasets` and `gguf` are not needed: local .jsonl files bypass the hub and a model directory
# already in SLICEGPT_CACHE bypasses the GGUF conversion.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
GPU=.gpu
MODEL_CACHE=${MODEL_CACHE:-$HOME/.cache/slicegpt/smollm2-135m}
DATA=${DATA:-../shared/data/wikitext-2}
TRANSFORMERS=$($PY -c "import importlib.metadata as m; print(m.version('transformers'))")
REGEX=$($PY -c "import importlib.metadata as m; print(m.version('regex'))")

grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf "$GPU/snapshot" && mkdir -p "$GPU/snapshot" "$GPU/model" "$GPU/shared/data/wikitext-2" "$GPU/wheels"
if [ "${SNAPSHOT_FROM:-HEAD}" = worktree ]; then
    tar -c --exclude=__pycache__ src bench | tar -x -C "$GPU/snapshot"
    echo "worktree of $(git rev-parse HEAD)" > "$GPU/snapshot/COMMIT"
else
    git archive HEAD src bench | tar -x -C "$GPU/snapshot"
    git rev-parse HEAD > "$GPU/snapshot/COMMIT"
fi
[ -f "$MODEL_CACHE/config.json" ] || $PY -c "from slicegpt.io.models import resolve; resolve('smollm2-135m')"
for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
    [ -f "$MODEL_CACHE/$f" ] && cp "$MODEL_CACHE/$f" "$GPU/model/"
done
cp "$DATA/wikitext-2-v1.validation.jsonl" "$DATA/wikitext-2-raw-v1.test.jsonl" "$GPU/shared/data/wikitext-2/"
rm -f "$GPU"/wheels/*.whl
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$GPU/wheels" "transformers==$TRANSFORMERS" "regex==$REGEX"
ls -la "$GPU/wheels"
du -sh "$GPU"
