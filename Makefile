# nanoserve: `make setup`, then `make run` and `make test`. Everything runs from .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TINY_MODEL := .tiny_model
MODEL ?= $(TINY_MODEL)
TP ?= 1
PORT ?= 50051

.PHONY: setup protos tiny-model run serve test test-gpu bench bench-cpu lint clean

setup: $(BIN)/python protos tiny-model

$(BIN)/python: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch pinned: 2.13.0 is the CPU build on CPU machines (a bare `torch` pulls CUDA wheels).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	touch $(BIN)/python

protos: $(BIN)/python
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --pyi_out=. \
		protos/nanoserve/v1/generation.proto protos/nanoserve/worker/v1/worker.proto

tiny-model: $(BIN)/python
	$(BIN)/python -m models.tiny --out $(TINY_MODEL)

run:
	$(BIN)/python -m nanoserve run --model $(MODEL)

serve:
	$(BIN)/python -m nanoserve serve --model $(MODEL) --port $(PORT) --tp $(TP)

test:
	$(BIN)/python -m pytest -q -m "not gpu"

test-gpu:
	bash tests/gpu/run_all.sh $${OUT:-out/gpu}

bench:
	$(BIN)/python -m bench.throughput --model $(MODEL)

bench-cpu:
	$(BIN)/python -m bench.control_plane

lint:
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(TINY_MODEL) nanoserve/v1 nanoserve/worker
