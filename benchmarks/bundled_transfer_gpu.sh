#!/usr/bin/env bash
# The bundled model's transfer stage and its evaluation on held-out families, on one H200.
#   PART=T  train RECIPE (default recipes/bundled_stage5.json) from the checkpoint INIT (default the
#           shipped model, the stage-4 checkpoint up to commit 75daad5), copied to the recipe's
#           init_from first; the checkpoint comes back under $OUT/model/.
#   EVAL=1  the evaluation table of MODEL (default src/qwen1m/bundled, or what PART=T trained):
#           held-out passkey 1x/8x/32x and RULER niah (8 tasks) 1x/16x with DCA, held-out passkey
#           1x-4x with plain RoPE, and training-family passkey 1x/8x and niah 1x.
#     GIT_COMMIT=<hash> PART=T RECIPE=recipes/bundled_stage6.json INIT=runs/bundled-stage5 EVAL=1 \
#       bash benchmarks/bundled_transfer_gpu.sh
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

if [ "${PART:-}" = T ]; then
  # RECIPE continues INIT (a checkpoint folder copied to the recipe's init_from, runs/NAME)
  RECIPE=${RECIPE:-recipes/bundled_stage5.json}
  INIT=${INIT:-src/qwen1m/bundled}
  DEST=runs/$(python3 -c "import json,sys,pathlib; print(pathlib.Path(json.load(open(sys.argv[1]))['init_from']).name)" "$RECIPE")
  if [ "$INIT" != "$DEST" ]; then
    mkdir -p "$DEST"
    for f in config.json model.safetensors tokenizer.json tokenizer_config.json generation_config.json; do
      cp "$INIT/$f" "$DEST/"
    done
  fi
  timeout "${T_TRAIN:-480}" python3 -m qwen1m train --recipe "$RECIPE" --out "$W/train" 2>&1 \
    | grep -v " step [0-9]*[1-9][0-9]0 loss\| step [0-9]*[1-9]20 loss\| step [0-9]*[1-9][02468]0 loss" | tail -25
  mkdir -p "$OUT/model"
  cp "$W/train/final/"* "$OUT/model/"
  cp "$W/train/train_log.json" "$OUT/train_log.json"
  MODEL=$W/train/final
fi

if [ -n "${EVAL:-}" ]; then
  # the evaluation table of MODEL, every suite at once (the 7M model leaves the GPU mostly idle);
  # T_EVAL bounds each suite, a cut suite keeps the batches it finished
  T=${T_EVAL:-240}
  ev passkey_heldout "$T" 20000000000 passkey --model "$MODEL" --lengths "${PK_LENGTHS:-4k,32k,128k}" \
    --depths 0:100:10 --samples "${PK_SAMPLES:-10}" --modes dca &
  ev ruler_heldout "$T" 20000000000 ruler --model "$MODEL" --tasks $NIAH --lengths "${RULER_LENGTHS:-4k,64k}" \
    --samples "${RULER_SAMPLES:-10}" --modes dca &
  ev rope_heldout "$T" 6000000000 passkey --model "$MODEL" --lengths 4k,8k,16k --depths 0:100:10 --samples 5 --modes rope &
  ev passkey_train "$T" 10000000000 passkey --model "$MODEL" --families train --lengths 4k,32k --depths 0:100:10 \
    --samples 10 --modes dca &
  ev ruler_train "$T" 10000000000 ruler --model "$MODEL" --families train --tasks $NIAH --lengths 4k \
    --samples 10 --modes dca &
  wait
  show passkey_heldout ruler_heldout rope_heldout passkey_train ruler_train
  tar czf "$OUT/eval.tgz" -C "$W" passkey_heldout ruler_heldout rope_heldout passkey_train ruler_train
fi
ls -la "$OUT"
