#!/usr/bin/env bash
# The GPU measurements, grouped into device calls of at most 10 minutes each (one H200):
#   PART=A  the engine benchmark: decode at 32K / 128K / 1M context (the 1M row reserves its KV
#           without a 1M prefill, see bench_engine.decode), batch 32 x 8K, TTFT 32K / 128K / 256K,
#           transformers (sdpa) at 32K and 128K in the same run, where a decode step's time goes
#           (profile_decode), then sparse prefill TTFT at 128K / 256K with the 7B budget mix;
#   PART=B  TTFT of a 1M-token prompt, dense attention with DCA, the KV cache sized for 1M tokens so
#           the peak memory is what a 1M context needs (about 9 minutes: give it a call of its own; it
#           prints its progress, so a cut run still gives the rate);
#   PART=C  sparse prefill: where its time goes (profile_sparse_prefill at 128K), the attention-only
#           kernel table at 1M (both index builders), then end-to-end TTFT 128K / 256K / 1M with the
#           7B budget mix;
#   PART=E  diagnosis: the GPU tests of the kernels and the attention package beside the bundled
#           model's dca+sparse evaluation at 64K / 128K (resumed; neither timed), then where sparse
#           prefill's time goes for the bundled model (8 x 64K) and for 7B shapes (128K), then the
#           engine's decode rows;
#   PART=F  the rest of the bundled model's dca+sparse evaluation (resumed, every region sparse as in
#           the rows before it), the attention-only kernel table at 1M, then dense TTFT at 128K / 256K
#           (the baseline of PART=G; the dense 1M row is PART=B's);
#   PART=G  sparse TTFT at 128K / 256K / 1M, 7B budget mix, dense fallback above 60% density;
#   PART=H  (planned for the next session) every CUDA-graph GPU test (session 4 ran 3 of 7 in its time),
#           the bundled model's sparse config recalibrated at 128K (CAL_LENGTH) and dca+sparse passkey
#           at 32x with it (the 16K-calibrated config lost 13.6 points there);
#   PART=I  (planned) a 1M-context decode profile, the transformers decode baseline at 32K, and the
#           attention-only sparse table at 128K / 512K / 1M with uniform and 7B-mix budgets;
#   PART=J  decode profiles at 32K and 1M (step wall time against the kernels' sum), the transformers
#           baseline (TTFT and decode at 32K / 128K), every CUDA-graph GPU test;
#   PART=K  decode after the per-range split choice and one-rotation-per-program decode_prep: the
#           32K profile with the host's share, the engine's decode rows, the decode and engine GPU tests;
#   PART=L  overlapped decode (the next step launched before this one's tokens reach the host): the
#           CUDA-graph GPU tests, the 32K profile with the host's share, the engine's decode rows;
#   PART=M  the engine's decode rows (intervals between step returns: overlapped decode), then the
#           128K calibration of PART=H; PART=N: PART=H's passkey with it (CAL_CONFIG=the config);
#   PART=O  a coarser calibration (CAL_STEP=256), its passkey, the attention-only 7B-mix rows;
#   PART=Q  the bundled model calibrated at 124K with steps 1024 and 2048 (every head may reach 0.9),
#           the dca+sparse passkey at 128K with each;
#   PART=R  sparse density and recall of dummy-weight prompts at 128K / 256K (telemetry), warm TTFT at
#           32K / 128K and decode intervals at 32K / 1M;
#   PART=P  the sparse kernel's launch configurations (bench_sparse --sweep), the 1M rows;
#   PART=S  (planned, one call) sparse prefill after the dense-problems kernel and the dense hints: the
#           end-to-end rows of the bundled model at 128K / 512K and random 7B weights at 128K with the
#           profile at 128K, then the attention-only 7B-mix rows at 128K / 1M (rate per pair, split masks);
#           ATTN_DTYPE=fp8 takes the end-to-end rows with FP8 attention (dense and sparse);
#   PART=T  (planned, one call) FP8 attention: its GPU tests, the kernel table with the tile sweep (bf16
#           Triton and cuDNN in the same run; FP8_SWEEP= skips the sweep), TTFT at 128K with
#           attention_dtype auto and fp8, the sparse kernel bf16 vs FP8 on one 7B-mix index at 128K
#           (FP8_SPARSE=0 skips), then its accuracy on the bundled model (logits, passkey and RULER niah
#           on held-out text, 4K-128K; FP8_ACC=0 skips);
#   PART=D  every GPU test, and at the same time the bundled model's evaluation table
#           (benchmarks/eval_bundled_gpu.sh, resumed from the committed results): neither is timed,
#           so they share the call.
#     GIT_COMMIT=<hash> PART=A bash benchmarks/run_gpu_suite.sh   (writes under $OUT; give the hash
#     literally: the device's git HEAD is the last landed commit, not the working tree it runs)
# Every step has its own time limit, so a call ends in time and returns what it measured.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1 OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
C=$OUT/calib128k
# the bundled model's sparse config, calibrated on CAL_LENGTH-token sequences (124K: with the 4K of
# headroom it stays within the model's max_position_embeddings of 131072, which DCA requires)
calibrate_128k() {
  mkdir -p "$C"
  timeout "${T_CAL:-240}" python3 -m qwen1m calibrate --length "${CAL_LENGTH:-126976}" --samples 2 --base-vertical 64 \
    --base-slash 256 --step "${CAL_STEP:-32}" --max-steps 14 --target-recall 0.9 --device "${DEVICE:-cuda}" \
    --max-model-len $(( ${CAL_LENGTH:-126976} + 4096 )) --out "$C/sparse_attention_config.json" \
    --heatmap "$C/recall.png" 2>&1 | tail -14 | tee "$C/summary.txt"
}
passkey_calibrated() {  # dca+sparse passkey with that config (CAL_CONFIG: one from an earlier call)
  timeout "${T_EVAL:-200}" python3 -m qwen1m eval passkey --lengths "${EVAL_LENGTHS:-128k}" --depths 0:100:10 \
    --samples "${PK_SAMPLES:-10}" --modes dca+sparse --sparse-config "${CAL_CONFIG:-$C/sparse_attention_config.json}" \
    --sparse-threshold 512 --sparse-dense-above 1 --batch-size 8 --device "${DEVICE:-cuda}" \
    --out "$C/passkey" 2>&1 | tr "\r" "\n" | grep -v ETA | tail -4
}
case "${PART:-A}" in
S)
  timeout "${T_E2E:-330}" python3 benchmarks/bench_sparse_e2e.py --lengths 131072,524288 --random7b 131072 \
    --profile-length 131072 --repeats 3 --repeat-budget 8 --attention-dtype "${ATTN_DTYPE:-auto}" \
    --name "sparse_e2e_${ATTN_DTYPE:-auto}" 2>&1 | tail -12
  timeout "${T_SPARSE:-200}" python3 benchmarks/bench_sparse.py --sizes 131072,1048576 --budgets 7b-mix 2>&1 | tail -10
  ;;
T)
  timeout "${T_TESTS:-110}" python3 -m pytest -q -m gpu tests/kernels/test_flash_attn_fp8.py tests/kernels/test_sparse_attn_fp8.py \
    tests/attention/test_fp8_model.py \
    -p no:cacheprovider 2>&1 | tail -3
  timeout "${T_FP8:-160}" python3 benchmarks/bench_attention_fp8.py --sizes 32768,131072 --chunk-kv 1048576 \
    ${FP8_SWEEP---sweep} 2>&1 | tail -7
  for a in auto fp8; do
    timeout "${T_TTFT:-70}" python3 benchmarks/bench_engine.py --ttft 131072 --decode "" --enforce-eager \
      --max-model-len 140000 --kv-cache-tokens 140000 --attention-dtype $a --name engine_ttft_$a 2>&1 | grep "^| TTFT"
  done
  # the sparse kernel in bf16 and FP8 on the same 7B-mix index (sparse_fp8_ms, fp8_speedup_vs_bf16_sparse)
  [ "${FP8_SPARSE:-1}" = 1 ] && timeout "${T_SPARSE8:-90}" python3 benchmarks/bench_sparse.py --sizes 131072 \
    --budgets 7b-mix 2>&1 | grep -o "'sparse_ms': [0-9.]*\|'sparse_fp8_ms': [0-9.]*\|'fp8_speedup_vs_bf16_sparse': [0-9.]*\|'sparse_fp8_error': [^}]*"
  [ "${FP8_ACC:-1}" = 1 ] && timeout "${T_ACC:-200}" python3 benchmarks/eval_fp8_accuracy.py --lengths 4096,32768,126976 \
    --eval-lengths 4k,32k,128k --depths 0:100:25 --samples 2 --ruler-samples 10 2>&1 | tail -10
  ;;
A)
  timeout "${T_ENGINE:-330}" python3 benchmarks/bench_engine.py --ttft 32768,131072,262144 \
    --decode 32768,131072,1000000 --skip-prefill --batch32 --hf-baseline 32768,131072 2>&1 | tail -16
  timeout "${T_PROFILE:-60}" python3 benchmarks/profile_decode.py 2>&1 | tail -45 > "$OUT/profile_decode.txt"
  timeout "${T_SPARSE:-100}" python3 benchmarks/bench_engine.py --sparse 7b-mix --ttft 131072,262144 \
    --decode "" 2>&1 | tail -6
  ;;
B)
  timeout "${T_ENGINE:-580}" python3 benchmarks/bench_engine.py --ttft 1000000 --decode "" \
    --max-model-len 1000064 --kv-cache-tokens 1000064 --enforce-eager --name engine_1m 2>&1 | tail -16
  ;;
C)
  timeout "${T_PROFILE:-150}" python3 benchmarks/profile_sparse_prefill.py --tokens 131072 2>&1 | tail -60 \
    > "$OUT/profile_sparse_prefill.txt"
  head -8 "$OUT/profile_sparse_prefill.txt"
  timeout "${T_SPARSE:-150}" python3 benchmarks/bench_sparse.py --sizes 1048576 2>&1 | tail -20
  timeout "${T_ENGINE:-280}" python3 benchmarks/bench_engine.py --sparse 7b-mix --ttft 131072,262144,1000000 \
    --decode "" --enforce-eager 2>&1 | tail -12
  ;;
E)
  timeout "${T_TESTS:-200}" python3 -m pytest tests/kernels tests/attention -m gpu -q -p no:cacheprovider \
    >"$OUT/gpu_tests.log" 2>&1 &
  T_PASSKEY=${T_EVAL:-200} T_RULER=${T_EVAL:-200} T_NEEDLE=5 LENGTHS=${LENGTHS:-64k,128k} MODES=dca+sparse \
    EXTRA_ARGS="--batch-size 8" RESUME_FROM=${RESUME_FROM:-benchmarks/results/eval_bundled_2026-11-29_} \
    bash benchmarks/eval_bundled_gpu.sh | grep -v "^-\|^d\|^total"
  wait
  tail -4 "$OUT/gpu_tests.log"
  timeout 90 python3 benchmarks/profile_sparse_prefill.py --model src/qwen1m/bundled --load-format auto \
    --sparse-config benchmarks/results/calibrate_bundled_cpu_2026-11-29/sparse_attention_config.json \
    --sparse-threshold 512 --tokens 65536 --prompts 8 2>&1 | tail -60 > "$OUT/profile_sparse_bundled.txt"
  head -6 "$OUT/profile_sparse_bundled.txt"
  timeout 110 python3 benchmarks/profile_sparse_prefill.py --tokens 131072 2>&1 | tail -60 \
    > "$OUT/profile_sparse_prefill.txt"
  head -6 "$OUT/profile_sparse_prefill.txt"
  timeout 150 python3 benchmarks/bench_engine.py --ttft "" --decode 32768,131072,1000000 --skip-prefill \
    --batch32 2>&1 | tail -8
  ;;
F)
  T_PASSKEY=${T_EVAL:-220} T_RULER=${T_EVAL:-220} T_NEEDLE=5 LENGTHS=${LENGTHS:-128k} MODES=dca+sparse \
    EXTRA_ARGS="--batch-size 8 --sparse-dense-above 1" \
    RESUME_FROM=${RESUME_FROM:-benchmarks/results/eval_bundled_2026-11-29_} \
    bash benchmarks/eval_bundled_gpu.sh | grep -v "^-\|^d\|^total"
  timeout "${T_SPARSE:-130}" python3 benchmarks/bench_sparse.py --sizes 1048576 2>&1 | tail -12
  timeout "${T_ENGINE:-120}" python3 benchmarks/bench_engine.py --ttft 131072,262144 --decode "" --enforce-eager \
    --kv-cache-tokens 1000064 --max-model-len 1000064 --name engine_dense_baseline 2>&1 | tail -4
  ;;
G)
  timeout "${T_ENGINE:-580}" python3 benchmarks/bench_engine.py --sparse 7b-mix --ttft 131072,262144,1000000 \
    --decode "" --enforce-eager --kv-cache-tokens 1000064 --max-model-len 1000064 2>&1 | tail -20
  ;;
H)
  [ "${T_TESTS:-150}" -gt 0 ] && timeout "${T_TESTS:-150}" python3 -m pytest -q -m gpu tests/engine/test_cuda_graph.py -p no:cacheprovider 2>&1 | tail -3
  calibrate_128k
  passkey_calibrated
  ;;
O)  # a coarser calibration (CAL_STEP=256) and its passkey, then the sparse table's 7B-mix rows
  calibrate_128k
  passkey_calibrated
  timeout "${T_SPARSE:-230}" python3 benchmarks/bench_sparse.py --budgets 7b-mix 2>&1 | tail -10
  ;;
P)  # the sparse kernel's launch configurations (warps, stages, head-major grid) at 512K, then the 1M rows
  timeout "${T_SPARSE:-400}" python3 benchmarks/bench_sparse.py --sizes 1048576 --budgets uniform,7b-mix \
    --sweep 524288 2>&1 | tail -20
  ;;
Q)  # calibrations at 124K that let every head reach 0.9 (steps 1024 and 2048, 14 steps), each with its passkey
  for step in ${CAL_STEPS:-1024 2048}; do
    C=$OUT/calib128k_step$step CAL_STEP=$step calibrate_128k
    C=$OUT/calib128k_step$step passkey_calibrated
  done
  ;;
R)  # sparse density / recall of dummy-weight prompts (telemetry rows, not timed for comparison), then
    # warm 32K TTFT and decode intervals after the block-pool fix
  timeout "${T_SPARSE:-150}" python3 benchmarks/bench_engine.py --sparse 7b-mix --sparse-telemetry \
    --ttft 131072,262144 --decode "" --name engine_sparse_telemetry 2>&1 | grep -v prefill | tail -4
  timeout "${T_ENGINE:-200}" python3 benchmarks/bench_engine.py --ttft 32768,131072 --decode 32768,1000000 \
    --skip-prefill --name engine_recheck 2>&1 | tail -8
  ;;
M)
  timeout 200 python3 benchmarks/bench_engine.py --ttft "" --decode 32768,131072,1000000 --skip-prefill \
    --batch32 --name engine_decode_overlap 2>&1 | tail -8
  calibrate_128k
  ;;
N)
  passkey_calibrated
  ;;
I)
  timeout 90 python3 benchmarks/profile_decode.py --context 1000000 2>&1 | tail -45 > "$OUT/profile_decode_1m.txt"
  timeout 150 python3 benchmarks/bench_engine.py --ttft "" --decode "" --hf-baseline 32768,131072 \
    --name engine_hf_baseline 2>&1 | tail -4
  timeout 300 python3 benchmarks/bench_sparse.py 2>&1 | tail -16
  ;;
J)
  timeout 100 python3 benchmarks/profile_decode.py 2>&1 | tail -50 > "$OUT/profile_decode_32k.txt"
  head -3 "$OUT/profile_decode_32k.txt"
  timeout 120 python3 benchmarks/profile_decode.py --context 1000000 2>&1 | tail -50 > "$OUT/profile_decode_1m.txt"
  head -3 "$OUT/profile_decode_1m.txt"
  timeout 150 python3 benchmarks/bench_engine.py --ttft "" --decode "" --hf-baseline 32768,131072 \
    --name engine_hf_baseline 2>&1 | tail -4
  timeout "${T_TESTS:-140}" python3 -m pytest -q -m gpu tests/engine/test_cuda_graph.py -p no:cacheprovider 2>&1 | tail -3
  ;;
K)
  timeout 120 python3 benchmarks/profile_decode.py --host 2>&1 | tail -95 > "$OUT/profile_decode_32k_host.txt"
  grep -m3 "decode step\|kernels:\|host, per step" "$OUT/profile_decode_32k_host.txt"
  timeout 200 python3 benchmarks/bench_engine.py --ttft "" --decode 32768,131072,1000000 --skip-prefill \
    --batch32 --name engine_decode 2>&1 | tail -8
  timeout "${T_TESTS:-150}" python3 -m pytest -q -m gpu tests/kernels/test_paged_decode.py \
    tests/kernels/test_paged_decode_multi.py tests/kernels/test_decode_prep.py tests/engine -p no:cacheprovider 2>&1 | tail -3
  ;;
L)
  timeout 150 python3 -m pytest -q -m gpu tests/engine/test_cuda_graph.py tests/kernels/test_decode_prep.py \
    -p no:cacheprovider 2>&1 | tail -3
  timeout 120 python3 benchmarks/profile_decode.py --host 2>&1 | tail -95 > "$OUT/profile_decode_32k_overlap.txt"
  grep -m3 "decode step\|kernels:\|host, per step" "$OUT/profile_decode_32k_overlap.txt"
  timeout 200 python3 benchmarks/bench_engine.py --ttft "" --decode 32768,131072,1000000 --skip-prefill \
    --batch32 --name engine_decode_overlap 2>&1 | tail -8
  ;;
D)
  timeout "${T_TESTS:-300}" python3 -m pytest tests/kernels tests/attention tests/engine tests/model -m gpu -q \
    -p no:cacheprovider >"$OUT/gpu_tests.log" 2>&1 &
  RESUME_FROM=${RESUME_FROM:-benchmarks/results/eval_bundled_2026-11-29_} bash benchmarks/eval_bundled_gpu.sh
  wait
  tail -15 "$OUT/gpu_tests.log"
  ;;
esac
