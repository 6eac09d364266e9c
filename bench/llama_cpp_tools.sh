#!/usr/bin/env bash
# Build llama.cpp's command-line tools (llama-quantize, llama-imatrix, llama-perplexity,
# llama-bench) from llama-cpp-python's source distribution, which carries llama.cpp's full
# source, into a cache outside the repository. For benchmarks on a workstation; never run in CI.
#
#     bench/llama_cpp_tools.sh [CACHE_DIR]      # default: $SLICEGPT_LLAMA_TOOLS or ~/.cache/slicegpt/llama-tools
#
# The tools land in CACHE_DIR/bin; put that on PATH (or pass --quantizer CACHE_DIR/bin/llama-quantize)
# and `slicegpt export --quantize` uses llama-quantize, with an importance matrix.
# Idempotent: a finished build is reused. Uses all cores at the lowest priority (nice 19).
# How long the build took goes into CACHE_DIR/build_time.json (seconds, date, cores, the load
# average before and after, the source); bench/llama_cpp_quant.py copies it into its results.
#
# llama.cpp's weight repacking is built off (-DGGML_CPU_REPACK=OFF) and AMX stays off: on a VM whose
# CPU reports AMX, the AMX and repacked kernels for quantized types die with SIGILL. Run the tools
# with --no-repack (llama-perplexity, llama-imatrix) or --repack 0 (llama-bench) as well.
set -euo pipefail

CACHE="${1:-${SLICEGPT_LLAMA_TOOLS:-$HOME/.cache/slicegpt/llama-tools}}"
TOOLS=(llama-quantize llama-imatrix llama-perplexity llama-bench)
mkdir -p "$CACHE/bin"
built=1
for tool in "${TOOLS[@]}"; do [ -x "$CACHE/bin/$tool" ] || built=0; done
if [ "$built" = 1 ]; then echo "llama.cpp tools already built in $CACHE/bin"; exit 0; fi

PYTHON="${PYTHON:-python3}"
if ! ls "$CACHE"/src/llama_cpp_python-*.tar.gz >/dev/null 2>&1; then
  mkdir -p "$CACHE/src"
  "$PYTHON" -m pip download --no-deps --no-binary :all: "llama-cpp-python${LLAMA_CPP_PYTHON_VERSION:+==$LLAMA_CPP_PYTHON_VERSION}" \
    -d "$CACHE/src"
fi
SDIST="$(ls "$CACHE"/src/llama_cpp_python-*.tar.gz | tail -1)"
SOURCE="$CACHE/src/$(basename "$SDIST" .tar.gz)"
[ -d "$SOURCE" ] || tar -xzf "$SDIST" -C "$CACHE/src"
LLAMA="$SOURCE/vendor/llama.cpp"

started=$(date +%s)
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
nice -n 19 cmake -S "$LLAMA" -B "$CACHE/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DGGML_CPU_REPACK=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON >"$CACHE/cmake.log" 2>&1
nice -n 19 cmake --build "$CACHE/build" --config Release -j "$(nproc)" --target "${TOOLS[@]}" >"$CACHE/build.log" 2>&1
for tool in "${TOOLS[@]}"; do
  cp "$CACHE/build/bin/$tool" "$CACHE/bin/$tool"
done
cat >"$CACHE/build_time.json" <<JSON
{"seconds": $(( $(date +%s) - started )), "date": "$(date +%Y-%m-%d)", "cores": $(nproc),
 "load_average_before": "$load_before", "load_average_after": "$(cut -d' ' -f1-3 /proc/loadavg)",
 "source": "$(basename "$SOURCE")", "tools": "${TOOLS[*]}"}
JSON
echo "llama.cpp $(basename "$SOURCE") tools in $CACHE/bin: ${TOOLS[*]} (built in $(( $(date +%s) - started )) s)"
