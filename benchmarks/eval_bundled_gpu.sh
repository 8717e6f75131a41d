#!/usr/bin/env bash
# The README's Results table for the bundled model (issues 6 and 7), in one device call:
#   - passkey grid, 1x-32x its 4K training length, depths 0-100% step 10, 10 samples per cell,
#     rope / dca / dca+sparse;
#   - single needle (RULER niah_single_1), 100 samples per length 1x-16x, rope / dca;
#   - the eight RULER niah tasks, 1x-32x, 10 samples per task and length, rope / dca / dca+sparse.
# Each suite runs under its own time limit (a cut suite keeps what it finished: the JSON is rewritten
# after every batch); all outputs are packed into $OUT/eval.tgz at the end.
#   MODEL=src/qwen1m/bundled bash benchmarks/eval_bundled_gpu.sh
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-eval_results}
W=${WORK:-/tmp/qwen1m-eval}
MODEL=${MODEL:-src/qwen1m/bundled}
LENGTHS=4k,8k,16k,32k,64k,128k
NIAH=niah_single_1,niah_single_2,niah_single_3,niah_multikey_1,niah_multikey_2,niah_multikey_3,niah_multivalue,niah_multiquery
mkdir -p "$W" "$OUT"
timeout "${T_PASSKEY:-220}" python3 -m qwen1m eval passkey --model "$MODEL" --lengths $LENGTHS --depths 0:100:10 \
  --samples 10 --modes rope,dca,dca+sparse --out "$W/passkey" 2>&1 | tr "\r" "\n" | grep -v ETA | tail -30
timeout "${T_NEEDLE:-120}" python3 -m qwen1m eval ruler --model "$MODEL" --tasks niah_single_1 \
  --lengths 4k,8k,16k,32k,64k --samples 100 --modes rope,dca --out "$W/needle" 2>&1 | tr "\r" "\n" | grep -v ETA | tail -20
timeout "${T_RULER:-200}" python3 -m qwen1m eval ruler --model "$MODEL" --tasks $NIAH --lengths $LENGTHS \
  --samples 10 --modes rope,dca,dca+sparse --out "$W/ruler" 2>&1 | tr "\r" "\n" | grep -v ETA | tail -40
tar czf "$OUT/eval.tgz" -C "$W" .
ls -la "$OUT"
