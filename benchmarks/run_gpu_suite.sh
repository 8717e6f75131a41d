#!/usr/bin/env bash
# The GPU measurements, grouped into device calls of at most 10 minutes each (one H200):
#   PART=A  GPU tests of every kernel and the CUDA-graph engine, then the engine benchmark: decode at
#           32K / 128K / 1M context (the 1M row reserves its KV without a 1M prefill, see
#           bench_engine.decode), batch 32 x 8K, TTFT 32K / 128K / 256K, transformers (sdpa) at 32K
#           and 128K in the same run, and where a decode step's time goes (profile_decode);
#   PART=B  TTFT of a 1M-token prompt, dense attention with DCA (~8 minutes);
#   PART=C  sparse prefill: end-to-end TTFT 128K / 256K / 1M with the 7B budget mix, and the
#           attention-only kernel table at 1M;
#   PART=D  the bundled model's evaluation table (benchmarks/eval_bundled_gpu.sh).
#     GIT_COMMIT=$(git rev-parse HEAD) PART=A bash benchmarks/run_gpu_suite.sh   (writes under $OUT)
# Every step has its own time limit, so a call ends in time and returns what it measured.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1 OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
case "${PART:-A}" in
A)
  timeout "${T_TESTS:-170}" python3 -m pytest tests/kernels tests/attention tests/engine tests/model -m gpu -q \
    -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
  timeout "${T_ENGINE:-330}" python3 benchmarks/bench_engine.py --ttft 32768,131072,262144 \
    --decode 32768,131072,1000000 --skip-prefill --batch32 --hf-baseline 32768,131072 2>&1 | tail -16
  timeout "${T_PROFILE:-60}" python3 benchmarks/profile_decode.py 2>&1 | tail -45 > "$OUT/profile_decode.txt"
  ;;
B)
  timeout "${T_ENGINE:-580}" python3 benchmarks/bench_engine.py --ttft 1000000 --decode "" 2>&1 | tail -8
  ;;
C)
  timeout "${T_ENGINE:-420}" python3 benchmarks/bench_engine.py --sparse 7b-mix --ttft 131072,262144,1000000 \
    --decode "" 2>&1 | tail -8
  timeout "${T_SPARSE:-150}" python3 benchmarks/bench_sparse.py --sizes 1048576 2>&1 | tail -20
  ;;
D)
  T_PASSKEY=${T_PASSKEY:-200} T_NEEDLE=${T_NEEDLE:-150} T_RULER=${T_RULER:-220} bash benchmarks/eval_bundled_gpu.sh
  ;;
esac
