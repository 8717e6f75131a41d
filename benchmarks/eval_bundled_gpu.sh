#!/usr/bin/env bash
# The README's Results table for the bundled model, in one device call:
#   - passkey grid, 1x-32x its 4K training length, depths 0-100% step 10, 10 samples per cell,
#     rope / dca / dca+sparse;
#   - single needle (RULER niah_single_1), 100 samples per length 1x-16x, rope / dca;
#   - the eight RULER niah tasks, 1x-32x, 10 samples per task and length, rope / dca / dca+sparse.
# dca+sparse uses SPARSE_CONFIG (default: the config `qwen1m calibrate` refined on the CPU,
# benchmarks/results/calibrate_bundled_cpu_2026-11-29) above SPARSE_THRESHOLD prompt tokens.
# The three suites run as three processes at once (the 7M-parameter model leaves the GPU mostly idle,
# so they overlap), each with its own KV budget and time limit; a cut suite keeps what it finished (the
# JSON is rewritten after every batch). RESUME_FROM=PREFIX names earlier results PREFIXpasskey.json,
# PREFIXneedle.json, PREFIXruler.json: they are copied in first, so only the missing samples run. All outputs are packed
# into $OUT/eval.tgz at the end.
#   MODEL=src/qwen1m/bundled RESUME_FROM=benchmarks/results/eval_bundled_2026-11-29_ bash benchmarks/eval_bundled_gpu.sh
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-eval_results}
W=${WORK:-/tmp/qwen1m-eval}
MODEL=${MODEL:-src/qwen1m/bundled}
SPARSE_CONFIG=${SPARSE_CONFIG:-benchmarks/results/calibrate_bundled_cpu_2026-11-29/sparse_attention_config.json}
SPARSE_THRESHOLD=${SPARSE_THRESHOLD:-512}
LENGTHS=${LENGTHS:-4k,8k,16k,32k,64k,128k}
NEEDLE_LENGTHS=${NEEDLE_LENGTHS:-4k,8k,16k,32k,64k}
DEPTHS=${DEPTHS:-0:100:10}
read -r -a EXTRA <<<"${EXTRA_ARGS:-}"  # e.g. EXTRA_ARGS="--device cpu" for a dry run
NIAH=niah_single_1,niah_single_2,niah_single_3,niah_multikey_1,niah_multikey_2,niah_multikey_3,niah_multivalue,niah_multiquery
mkdir -p "$W"/passkey "$W"/needle "$W"/ruler "$OUT"
if [ -n "${RESUME_FROM:-}" ]; then
  # the results files name the model folder they were made with; point them at this machine's copy
  python3 - "$RESUME_FROM" "$W" "$MODEL" <<'EOF'
import json, sys
from pathlib import Path
prefix, work, model = sys.argv[1], Path(sys.argv[2]), str(Path(sys.argv[3]).resolve())
for suite in ("passkey", "needle", "ruler"):
    f = Path(f"{prefix}{suite}.json")
    if f.is_file():
        data = json.loads(f.read_text())
        data["meta"]["model"] = model
        (work / suite / f"{data['meta']['suite']}.json").write_text(json.dumps(data))
        print(f"resuming {suite}: {len(data['samples'])} samples already done")
EOF
fi
SP=(--sparse-config "$SPARSE_CONFIG" --sparse-threshold "$SPARSE_THRESHOLD")
run() {  # name, time limit, KV bytes, then the eval arguments
  local name=$1 limit=$2 kv=$3; shift 3
  timeout "$limit" python3 -m qwen1m eval "$@" --model "$MODEL" --kv-cache-memory "$kv" \
    --out "$W/$name" "${EXTRA[@]}" >"$W/$name.log" 2>&1
  echo "$name: exit $? after $SECONDS s"
}
run passkey "${T_PASSKEY:-540}" "${KV_BIG:-30000000000}" passkey --lengths "$LENGTHS" --depths "$DEPTHS" --samples "${PK_SAMPLES:-10}" \
  --modes "${MODES:-rope,dca,dca+sparse}" "${SP[@]}" &
run needle "${T_NEEDLE:-540}" "${KV_SMALL:-15000000000}" ruler --tasks niah_single_1 --lengths "$NEEDLE_LENGTHS" \
  --samples "${NEEDLE_SAMPLES:-100}" --modes rope,dca &
run ruler "${T_RULER:-540}" "${KV_BIG:-30000000000}" ruler --tasks $NIAH --lengths "$LENGTHS" --samples "${RULER_SAMPLES:-10}" \
  --modes "${MODES:-rope,dca,dca+sparse}" "${SP[@]}" &
wait
for name in passkey needle ruler; do
  echo "== $name"; tr "\r" "\n" <"$W/$name.log" | grep -v ETA | tail -12
done
tar czf "$OUT/eval.tgz" -C "$W" .
ls -la "$OUT"
