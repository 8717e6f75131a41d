#!/usr/bin/env bash
# The bundled model's transfer stage and its evaluation on held-out families, on one H200.
#   PART=T  stage 5 (recipes/bundled_stage5.json) from the stage-4 checkpoint (the bundled model up to
#           commit 75daad5, copied to runs/bundled-stage4 first), then a quick held-out check at 1x;
#           the checkpoint comes back under $OUT/model/.
#   PART=E  the evaluation table (MODEL, default src/qwen1m/bundled), three suites at once (the 7M model
#           leaves the GPU mostly idle): held-out passkey 1x/8x/32x with DCA and 2x/4x with plain RoPE,
#           held-out RULER niah (8 tasks) 1x/16x with DCA, and the same rows on the training families.
#     GIT_COMMIT=<hash> PART=T bash benchmarks/bundled_transfer_gpu.sh
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
W=${WORK:-/tmp/qwen1m-transfer}
MODEL=${MODEL:-src/qwen1m/bundled}
NIAH=niah_single_1,niah_single_2,niah_single_3,niah_multikey_1,niah_multikey_2,niah_multikey_3,niah_multivalue,niah_multiquery
mkdir -p "$W" "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "commit ${GIT_COMMIT:-unknown}; $(date -u +%FT%TZ)"
ev() {  # name, time limit, KV bytes, then the eval arguments; a cut suite keeps what it finished
  local name=$1 limit=$2 kv=$3; shift 3
  timeout "$limit" python3 -m qwen1m eval "$@" --kv-cache-memory "$kv" --out "$W/$name" >"$W/$name.log" 2>&1
  echo "$name: exit $? after $SECONDS s"
}
show() { for name in "$@"; do echo "== $name"; tr "\r" "\n" <"$W/$name.log" | grep -v ETA | tail -6; done; }

if [ "${PART:-T}" = T ]; then
  mkdir -p runs/bundled-stage4
  for f in config.json model.safetensors tokenizer.json tokenizer_config.json generation_config.json; do
    cp "src/qwen1m/bundled/$f" runs/bundled-stage4/
  done
  timeout "${T_TRAIN:-480}" python3 -m qwen1m train --recipe recipes/bundled_stage5.json --out "$W/train" 2>&1 \
    | grep -v " step [0-9]*[1-9][0-9]0 loss\| step [0-9]*[1-9]20 loss\| step [0-9]*[1-9][02468]0 loss" | tail -40
  mkdir -p "$OUT/model"
  cp "$W/train/final/"* "$OUT/model/"
  cp "$W/train/train_log.json" "$OUT/train_log_stage5.json"
  ev quick_passkey 100 8000000000 passkey --model "$W/train/final" --lengths 4k --depths 0:100:10 --samples 2 \
    --modes dca --batch-size 32 &
  ev quick_ruler 100 8000000000 ruler --model "$W/train/final" --tasks $NIAH --lengths 4k --samples 4 --modes dca \
    --batch-size 32 &
  wait
  show quick_passkey quick_ruler
  tar czf "$OUT/quick.tgz" -C "$W" quick_passkey quick_ruler
fi

if [ "${PART:-T}" = E ]; then
  F=${FAMILIES:-heldout}
  ev passkey_$F "${T_EVAL:-540}" 30000000000 passkey --model "$MODEL" --families "$F" --lengths "${PK_LENGTHS:-4k,32k,128k}" \
    --depths 0:100:10 --samples "${PK_SAMPLES:-10}" --modes dca &
  ev rope_$F "${T_EVAL:-540}" 8000000000 passkey --model "$MODEL" --families "$F" --lengths "${ROPE_LENGTHS:-4k,8k,16k}" \
    --depths 0:100:10 --samples "${ROPE_SAMPLES:-5}" --modes rope &
  ev ruler_$F "${T_EVAL:-540}" 30000000000 ruler --model "$MODEL" --families "$F" --tasks $NIAH \
    --lengths "${RULER_LENGTHS:-4k,64k}" --samples "${RULER_SAMPLES:-15}" --modes dca &
  wait
  show passkey_$F rope_$F ruler_$F
  tar czf "$OUT/eval_$F.tgz" -C "$W" passkey_$F rope_$F ruler_$F
fi
ls -la "$OUT"
