# nanoserve: `make setup`, then `make run` and `make test`. Everything runs from .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TINY_MODEL := .tiny_model
TRAINED_MODEL := models/tiny_trained
MODEL ?= $(TINY_MODEL)
TP ?= 1
PORT ?= 50051
# `make serve GATEWAY=1`: REPLICAS replicas behind the SMG gateway, the OpenAI API on GATEWAY_PORT
GATEWAY ?=
REPLICAS ?= 2
GATEWAY_PORT ?= 8000
GATEWAY_FLAGS := $(if $(filter 1,$(GATEWAY)),--gateway --replicas $(REPLICAS) --gateway-port $(GATEWAY_PORT))

.PHONY: setup protos tiny-model train-tiny run serve test test-compose test-gpu bench bench-cpu soak lint clean

setup: $(BIN)/python protos tiny-model

$(BIN)/python: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch pinned: 2.13.0 is the CPU build on CPU machines (a bare `torch` pulls CUDA wheels).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	touch $(BIN)/python

protos: $(BIN)/python
	PYTHON=$(BIN)/python bash scripts/gen_protos.sh

# The default model is the committed trained one (models/tiny_trained), copied; no training here.
tiny-model:
	rm -rf $(TINY_MODEL) && cp -r $(TRAINED_MODEL) $(TINY_MODEL)

# Retrain it, then `make tiny-model` to use it: the corpus (models/corpus/ and this Python's
# standard library) is tokenized into out/tiny_tokens.npz, the one file the training reads, so it
# can be carried to a GPU machine (a few minutes there; about 1.5 hours on a 2-core CPU).
train-tiny: $(BIN)/python
	$(BIN)/python -m models.train_tiny --write-tokens out/tiny_tokens.npz
	$(BIN)/python -m models.train_tiny --tokens out/tiny_tokens.npz --out $(TRAINED_MODEL)

run: protos
	$(BIN)/python -m nanoserve run --model $(MODEL)

serve: protos
	$(BIN)/python -m nanoserve serve --model $(MODEL) --port $(PORT) --tp $(TP) $(GATEWAY_FLAGS)

test: protos
	# The fast in-process tests first, then the ones that start real services.
	$(BIN)/python -m pytest -q -m "not gpu" tests/unit
	$(BIN)/python -m pytest -q -m "not gpu" tests/service

test-compose: $(BIN)/python
	NANOSERVE_TEST_COMPOSE=1 $(BIN)/python -m pytest -q -s tests/compose

soak: protos
	$(BIN)/python -m bench.soak --num-requests 6000 --concurrency 256 --out soak.json

test-gpu:
	bash tests/gpu/run_all.sh $${OUT:-out/gpu}

bench:
	$(BIN)/python -m bench.throughput --model $(MODEL)

bench-cpu: protos
	$(BIN)/python -m bench.control_plane

lint:
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && \
		$(BIN)/mypy protos scheduler_service worker_service models kernels nanoserve bench --follow-imports=silent

clean:
	rm -rf $(VENV) $(TINY_MODEL) protos/nanoserve/v1/*_pb2* protos/nanoserve/worker/v1/*_pb2*
