#!/usr/bin/env bash
# One device call: GPU tests of every kernel, then the decode, sparse and engine benchmarks, each
# under its own time limit so the call ends in time and returns what it measured.
#   GIT_COMMIT=$(git rev-parse HEAD) bash benchmarks/run_gpu_suite.sh   (on the H200; writes under $OUT)
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1 OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
timeout "${T_TESTS:-150}" python3 -m pytest tests/kernels tests/attention -m gpu -q -p no:cacheprovider 2>&1 \
  | tail -25 | tee "$OUT/gpu_tests.log"
timeout "${T_DECODE:-100}" python3 benchmarks/bench_decode.py --quick 2>&1 | tail -30 | tee "$OUT/decode.log"
timeout "${T_SPARSE:-120}" python3 benchmarks/bench_sparse.py --sizes "${SPARSE_SIZES:-131072,524288}" 2>&1 \
  | tail -30 | tee "$OUT/sparse.log"
timeout "${T_ENGINE:-150}" python3 benchmarks/bench_engine.py --ttft "${TTFT:-32768,131072}" \
  --decode "${DECODE:-32768,131072}" --batch32 2>&1 | tail -30 | tee "$OUT/engine.log"
