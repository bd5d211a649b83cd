#!/usr/bin/env bash
# Every GPU test and benchmark in one go: `bash tests/gpu/run_all.sh OUT_DIR`.
# Full logs and JSON land in OUT_DIR; a short table is printed last.
# On the lent GPU machine, carry .whl (grpcio extras) and the generated stubs (protos/nanoserve/v1,
# protos/nanoserve/worker/v1): its image lacks grpcio-tools and grpcio-health-checking (docs/gpu.md).
set -uo pipefail
OUT_DIR=${1:-out/gpu}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
cd "$(dirname "$0")/../.."
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  # --target skips .pth files: the CuTe DSL (flash-attn 4) finds its packages through this one.
  [ -d /tmp/site/nvidia_cutlass_dsl/dsl_packages ] &&
    export PYTHONPATH=$PYTHONPATH:/tmp/site/nvidia_cutlass_dsl/dsl_packages
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, triton, grpc; print('torch', torch.__version__, 'triton', triton.__version__, 'grpcio', grpc.__version__)"
  git rev-parse --short HEAD 2>/dev/null; date -u; } 2>&1 | tee "$OUT_DIR/env.txt"

step() { local name=$1; shift; echo "== $name: $*"; "$@" 2>&1 | tee "$OUT_DIR/$name.log"; }

# ONLY=tests, bench, attention, structured, limit, eightb, clocks, latency or gemms runs one part
# (each fits one 10-minute call).
# ATTENTION_BACKEND=flash-attn runs the GPU engine tests on that backend (default: auto).
if [ "${ONLY:-tests}" = tests ]; then
  # Modules whose imports the GPU image lacks (openai, smg) hold no GPU test: collect past them.
  step pytest_gpu $PY -m pytest -m gpu -q -rf -p no:cacheprovider --continue-on-collection-errors \
      --attention-backend "${ATTENTION_BACKEND:-auto}" tests
fi
if [ "${ONLY:-attention}" = attention ]; then
  # The attention backends side by side: kernels, then both workloads end to end per backend.
  step attention_bench $PY -m bench.attention_bench --out "$OUT_DIR/attention_bench.json"
  for workload in nano_bench_256 prefix_share_256; do
    for backend in triton flash-attn auto; do
      step "e2e_${workload}_$backend" $PY -m bench.throughput --arch qwen3-0.6b \
          --workload $workload --engines inprocess --attention-backend $backend
    done
  done
fi
if [ "${ONLY:-structured}" = structured ]; then
  # Structured output's cost to the free requests beside it: 10% constrained against none.
  for fraction in 0 0.1; do
    step "constrained_$fraction" $PY -m bench.throughput --arch qwen3-0.6b --engines grpc-stream \
        --passes 1 --constrained-fraction $fraction
  done
fi
if [ "${ONLY:-limit}" = limit ]; then
  # The hardware limit: one user's stream through the services (with its step trace), the
  # headline workload in-process and streamed, each GEMM against the copy bandwidth, then the 8B
  # at batch 1 (as one user, and each kernel of its step).
  step stream_rtt $PY -m bench.stream_rtt --modes sync --addrs tcp --busy-us 0  # does the host stall?
  step single_stream $PY -m bench.single_stream --arch qwen3-0.6b --requests 3 \
      --step-trace "$OUT_DIR/single_stream.trace"
  step single_stream_steps $PY -m bench.step_report "$OUT_DIR/single_stream.trace" \
      --arch qwen3-0.6b --bandwidth-gbps 4200
  step limit_nano_bench $PY -m bench.throughput --arch qwen3-0.6b --engines inprocess,grpc-stream
  step gemms $PY -m bench.gemm_bench --out "$OUT_DIR/gemms.json"
  step single_stream_8b $PY -m bench.single_stream --arch qwen3-8b --requests 2 --max-tokens 512
  step decode_profile $PY -m bench.decode_profile --arch qwen3-0.6b --batch 1,16,256 \
      --out "$OUT_DIR/decode_profile.jsonl"
fi
if [ "${ONLY:-eightb}" = eightb ]; then
  # Qwen3-8B architecture on one GPU: nano_bench_256 in-process and streamed (its one user at
  # batch 1 is in the limit part).
  step eightb_nano_bench $PY -m bench.throughput --arch qwen3-8b --engines inprocess,grpc-stream \
      --passes 1
fi
if [ "${ONLY:-clocks}" = clocks ]; then
  # Where the prefill steps' run-to-run spread comes from: nano_bench_256 in-process twice, each
  # with its step trace (every prefill step on its own line) and the SM clock and power sampled
  # beside it.
  for run in 1 2; do
    if command -v nvidia-smi > /dev/null; then
      nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu \
          --format=csv,noheader -lms 100 > "$OUT_DIR/clocks_$run.csv" &
      sampler=$!
    fi
    step "clocks_nano_bench_$run" $PY -m bench.throughput --arch qwen3-0.6b --engines inprocess \
        --step-trace "$OUT_DIR/clocks_trace_$run"
    [ -n "${sampler:-}" ] && kill "$sampler" && unset sampler
  done
fi
if [ "${ONLY:-latency}" = latency ]; then
  # One user's latency: the graph and engine GPU tests; the decode step's kernels with
  # programmatic dependent launch and without, side by side; decode attention's batch-1 latency; one user's stream with the defaults
  # (and its step trace) beside the same run with prefill steps eager.
  step pytest_latency $PY -m pytest -m gpu -q -rf -p no:cacheprovider \
      tests/unit/test_skinny_gemm.py tests/gpu/test_gpu_engine.py
  step latency_profile $PY -m bench.decode_profile --arch qwen3-0.6b --batch 1,16 --top 10 \
      --out "$OUT_DIR/latency_profile.jsonl"
  step decode_latency $PY bench/kernel_bench.py --latency  # batch-1 decode attention per call
  step latency_profile_no_pdl $PY -m bench.decode_profile --arch qwen3-0.6b --batch 1,16 \
      --top 10 --no-pdl --out "$OUT_DIR/latency_profile_no_pdl.jsonl"
  step latency_single_stream $PY -m bench.single_stream --arch qwen3-0.6b --requests 3 \
      --step-trace "$OUT_DIR/latency_single_stream.trace"
  step latency_single_stream_steps $PY -m bench.step_report \
      "$OUT_DIR/latency_single_stream.trace" --arch qwen3-0.6b --bandwidth-gbps 4200
  step latency_eager_prefill $PY -m bench.single_stream --arch qwen3-0.6b --requests 3 \
      --worker-args "--max-prefill-graph-tokens 0"
fi
if [ "${ONLY:-gemms}" = gemms ]; then  # the skinny GEMM's launch shapes swept at M <= 16
  step gemm_sweep $PY -m bench.gemm_bench --arch qwen3-0.6b --m 1,4,16 --skinny
fi
if [ "${ONLY:-bench}" = bench ]; then
  # The headline: services by their documented commands, default flags, empty compile caches,
  # untraced (add --step-trace DIR to see where the time goes).
  step nano_bench $PY -m bench.throughput --arch qwen3-0.6b \
      --engines ${ENGINES:-grpc-stream,grpc,inprocess,transformers} \
      --hf-limit 32 --hf-batch-size 32 --out "$OUT_DIR/nano_bench.json"
  for len in 2048 4096; do  # the same at other max_model_len (the default is the model's 40,960)
    step "user_path_$len" $PY -m bench.user_path --max-model-len $len --out "$OUT_DIR/sweep.jsonl"
  done
  step online $PY -m bench.online --arch qwen3-0.6b --rates 4,16,64 --num-requests 200
  # One user: one streaming request at a time (100-token prompt, 1,024 greedy tokens).
  step single_stream $PY -m bench.single_stream --arch qwen3-0.6b --requests 5
  if [ -z "${QUICK:-}" ]; then
    step prefix_on $PY -m bench.throughput --arch qwen3-0.6b --workload prefix_share_256 --engines inprocess
    step prefix_off $PY -m bench.throughput --arch qwen3-0.6b --workload prefix_share_256 \
        --engines inprocess --no-prefix-caching
    step kernels $PY bench/kernel_bench.py
  fi
fi

echo
echo "== summary =="
for f in pytest_gpu pytest_latency; do
  [ -f "$OUT_DIR/$f.log" ] && grep -E "^FAILED|^ERROR|passed|failed" "$OUT_DIR/$f.log" | tail -6 | sed "s/^/$f: /"
done
for f in nano_bench limit_nano_bench eightb_nano_bench prefix_on prefix_off constrained_0 constrained_0.1 \
    $(cd "$OUT_DIR" && ls e2e_*.log 2>/dev/null | sed 's/[.]log$//'); do
  [ -f "$OUT_DIR/$f.log" ] && grep -A8 "^engine" "$OUT_DIR/$f.log" | sed "s/^/$f: /"
done
for len in 2048 4096; do
  [ -f "$OUT_DIR/user_path_$len.log" ] && grep '"pass"' "$OUT_DIR/user_path_$len.log" | sed "s/^/max_model_len $len: /"
done
[ -f "$OUT_DIR/online.log" ] && tail -n 5 "$OUT_DIR/online.log"
[ -f "$OUT_DIR/stream_rtt.log" ] && tail -n 2 "$OUT_DIR/stream_rtt.log"
[ -f "$OUT_DIR/single_stream.log" ] && tail -n 1 "$OUT_DIR/single_stream.log" | cut -c1-400
for f in latency_single_stream latency_eager_prefill; do
  [ -f "$OUT_DIR/$f.log" ] && tail -n 1 "$OUT_DIR/$f.log" | cut -c1-400 | sed "s/^/$f: /"
done
[ -f "$OUT_DIR/decode_profile.log" ] && grep "^batch" "$OUT_DIR/decode_profile.log"
for f in latency_profile latency_profile_no_pdl; do
  [ -f "$OUT_DIR/$f.log" ] && grep "^batch" "$OUT_DIR/$f.log" | sed "s/^/$f: /"
done
[ -f "$OUT_DIR/single_stream_8b.log" ] && tail -n 1 "$OUT_DIR/single_stream_8b.log" | cut -c1-300
[ -f "$OUT_DIR/attention_bench.log" ] && tail -n 24 "$OUT_DIR/attention_bench.log"
for run in 1 2; do
  [ -f "$OUT_DIR/clocks_nano_bench_$run.log" ] && grep -E "^prefill/mixed|^total" \
      "$OUT_DIR/clocks_nano_bench_$run.log" | sed "s/^/clocks run $run: /"
  [ -s "$OUT_DIR/clocks_$run.csv" ] && awk -F', ' '{split($2, c, " "); if (min == "" || c[1] < min)
      min = c[1]; if (c[1] > max) max = c[1]} END {print "clocks run '"$run"': SM MHz " min "-" max}' \
      "$OUT_DIR/clocks_$run.csv"
done
exit 0
