#!/usr/bin/env bash
# Trains each PEFT-loadable method briefly on the quickstart data, then compares the eval loss of
# the adapter ferrotune wrote, in Hugging Face PEFT (scripts/verify/peft_eval.py on the fp32 HF
# copy of the model) and in `ferrotune eval` (on the GGUF), on 20 GSM8K dev problems as text.
# Needs `bash ../shared/bench/peers/setup.sh` (.peers/: torch + peft + the HF copy).
#
#   bash scripts/verify/methods_in_peft.sh [METHOD ...]     (default: dora eva pissa corda)
set -euo pipefail
cd "$(dirname "$0")/../.."
py=.peers/venv/bin/python
[ -x "$py" ] && [ -d .peers/smollm2-135m-hf ] || { echo "needs .peers/ (run ../shared/bench/peers/setup.sh)" >&2; exit 1; }
bash scripts/fetch-model.sh >/dev/null
cargo build --release --quiet
bin=target/release/ferrotune
gguf=.models/SmolLM2-135M-Instruct.Q4_1.gguf
out=runs/verify-methods
mkdir -p "$out"
python3 - > "$out/dev20.jsonl" <<'PY'
import json
for i, line in enumerate(open("examples/quickstart/data/gsm8k_dev_50.jsonl")):
    if i == 20: break
    r = json.loads(line)
    print(json.dumps({"text": "Question: " + r["question"] + "\nAnswer: " + r["answer"]}))
PY
methods=("$@")
[ ${#methods[@]} -gt 0 ] || methods=(dora eva pissa corda)
printf '| method | PEFT eval loss | ferrotune eval loss | relative difference |\n|---|---|---|---|\n'
for m in "${methods[@]}"; do
  "$bin" train examples/quickstart/gsm8k-lora.toml --overwrite --set adapter="$m" --set max_steps=2 --set save_steps=0 \
    --set output_dir="$out/$m" --set lora_target_modules='["q_proj","v_proj","up_proj"]' --set tri_interval=1 > "$out/$m.log" 2>&1 \
    || { [ "$m" != triadaptlora ] || true; }
  if [ ! -f "$out/$m/adapter/adapter_config.json" ]; then
    # tri_interval is triadaptlora's own key; others refuse it: train again without it.
    "$bin" train examples/quickstart/gsm8k-lora.toml --overwrite --set adapter="$m" --set max_steps=2 --set save_steps=0 \
      --set output_dir="$out/$m" --set lora_target_modules='["q_proj","v_proj","up_proj"]' > "$out/$m.log" 2>&1
  fi
  theirs=$("$py" scripts/verify/peft_eval.py --model .peers/smollm2-135m-hf --adapter "$out/$m/adapter" --data "$out/dev20.jsonl" 2>/dev/null | tail -1)
  ours=$("$bin" eval --model "$gguf" --adapter "$out/$m/adapter" --data "$out/dev20.jsonl" 2>/dev/null | tail -1)
  python3 -c "
import json,sys
a=json.loads('''$theirs''')['loss']; b=json.loads('''$ours''')['loss']
print(f'| \`$m\` | {a:.7f} | {b:.7f} | {abs(a-b)/abs(a):.1e} |')"
done
