#!/usr/bin/env bash
# Every GPU test and benchmark in one go: `bash tests/gpu/run_all.sh OUT_DIR`.
# Full logs and JSON land in OUT_DIR; a short table is printed last.
set -uo pipefail
OUT_DIR=${1:-out/gpu}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
cd "$(dirname "$0")/../.."
# The GPU image lacks a few pure-Python packages: install carried wheels (see docs/gpu.md).
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  git rev-parse --short HEAD 2>/dev/null; date -u; } 2>&1 | tee "$OUT_DIR/env.txt"

$PY -m pytest -m gpu -q -x -p no:cacheprovider tests 2>&1 | tee "$OUT_DIR/pytest_gpu.log"
tests_rc=${PIPESTATUS[0]}

$PY -m bench.throughput --arch qwen3-0.6b --engines ${ENGINES:-inprocess,transformers} \
    --out "$OUT_DIR/throughput.json" 2>&1 | tee "$OUT_DIR/throughput.log"
[ -f bench/kernel_bench.py ] && $PY bench/kernel_bench.py 2>&1 | tee "$OUT_DIR/kernel_bench.log"

echo
echo "== summary =="
grep -E "passed|failed|error" "$OUT_DIR/pytest_gpu.log" | tail -1
tail -n 6 "$OUT_DIR/throughput.log"
[ -f "$OUT_DIR/kernel_bench.log" ] && tail -n 8 "$OUT_DIR/kernel_bench.log"
exit $tests_rc
