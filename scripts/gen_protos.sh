#!/usr/bin/env bash
# Generate the Python gRPC stubs next to the .proto files: protos/nanoserve/v1/, protos/nanoserve/worker/v1/.
# The generated files are git-ignored and never edited by hand; run this after changing a .proto.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
"$PYTHON" -m grpc_tools.protoc -I. \
  --python_out=. --grpc_python_out=. --pyi_out=. \
  protos/nanoserve/v1/generation.proto \
  protos/nanoserve/worker/v1/worker.proto
