#!/usr/bin/env bash
# RoSTE against quantising after SFT, on the quickstart recipe (SmolLM2-135M Q4_1, LoRA r = 16 on
# all seven projections, 15 steps of 4 GSM8K problems, lora_dropout = 0 for both): the dev loss
# (50 held-out problems) of the float SFT model, of that model run as W4A8 with the same per-site
# rotations RoSTE chose (post-training quantisation), and of the RoSTE model run as W4A8.
# Runs go to runs/roste/; prints a Markdown table. FERROTUNE=path runs another binary.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-model.sh >/dev/null
FT=${FERROTUNE:-target/release/ferrotune}
[ -n "${FERROTUNE:-}" ] || cargo build --release --quiet
MODEL=.models/SmolLM2-135M-Instruct.Q4_1.gguf
DEV=examples/quickstart/data/gsm8k_dev_50.jsonl
mkdir -p runs/roste
"$FT" train examples/quickstart/gsm8k-lora.toml --overwrite --set lora_dropout=0 --set output_dir=runs/roste/sft | tail -1 > runs/roste/sft.summary.json
"$FT" train examples/quickstart/gsm8k-lora.toml --overwrite --set lora_dropout=0 --set objective=roste \
  --set output_dir=runs/roste/roste | tail -1 > runs/roste/roste.summary.json
# The SFT adapter with RoSTE's plan beside it: quantised after training, same grid and rotations.
rm -rf runs/roste/sft-ptq && cp -r runs/roste/sft/adapter runs/roste/sft-ptq && cp runs/roste/roste/adapter/roste.json runs/roste/sft-ptq/
eval_loss() { "$FT" eval --model "$MODEL" --adapter "$1" --data "$DEV" --sequence-len 256 "${@:2}" | tail -1; }
eval_loss runs/roste/sft/adapter > runs/roste/sft.float.json
eval_loss runs/roste/sft-ptq --fake-quant > runs/roste/sft.w4a8.json
eval_loss runs/roste/roste/adapter --fake-quant > runs/roste/roste.w4a8.json
eval_loss runs/roste/roste/adapter > runs/roste/roste.float.json
python3 - <<'PY'
import json
l = lambda f: json.load(open(f"runs/roste/{f}.json"))["loss"]
print("| model (dev loss, 50 GSM8K problems, eval's tokenization) | float | W4A8 (fake-quantised, RoSTE's rotations) |")
print("|---|---|---|")
print(f"| SFT, then quantised (post-training) | {l('sft.float'):.4f} | {l('sft.w4a8'):.4f} |")
print(f"| RoSTE (quantisation-aware SFT) | {l('roste.float'):.4f} | {l('roste.w4a8'):.4f} |")
PY
