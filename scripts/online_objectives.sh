#!/usr/bin/env bash
# GSM8K accuracy on 100 dev problems (greedy, `ferrotune eval --task gsm8k`) of: the base model;
# the quickstart's SFT adapter (15 steps); 20 GRPO steps on top of it (merged into the base, so
# GRPO's KL anchors to the SFT policy; examples/grpo/gsm8k-grpo.toml); and a SASR run from the base model (15 SFT warm-up steps,
# then 20 mixed steps; examples/grpo/gsm8k-sasr.toml). Prints a Markdown table with each run's
# rollout speed and writes every generation to runs/online/*.predictions.jsonl.
# About an hour on 2 cores. FERROTUNE=path runs another binary.
set -euo pipefail
cd "$(dirname "$0")/.."
FT=${FERROTUNE:-target/release/ferrotune}
MODEL=.models/SmolLM2-135M-Instruct.Q4_1.gguf
DEV=examples/grpo/data/gsm8k_dev_100.jsonl
bash scripts/fetch-model.sh
[ -n "${FERROTUNE:-}" ] || cargo build --release
mkdir -p runs/online
accuracy() { # NAME BASE [ADAPTER]
  "$FT" eval --model "$2" ${3:+--adapter "$3"} --data "$DEV" --task gsm8k --batch-size 16 \
    --max-new-tokens 256 --predictions "runs/online/$1.predictions.jsonl" | tail -1 > "runs/online/$1.accuracy.json"
}
"$FT" train examples/quickstart/gsm8k-lora.toml --overwrite --set output_dir=runs/online/sft
"$FT" merge --model "$MODEL" --adapter runs/online/sft/adapter --out runs/online/sft-merged --dtype bf16 --overwrite
"$FT" train examples/grpo/gsm8k-grpo.toml --overwrite
"$FT" train examples/grpo/gsm8k-sasr.toml --overwrite
accuracy base "$MODEL"
accuracy sft "$MODEL" runs/online/sft/adapter
accuracy grpo runs/online/sft-merged runs/online/grpo/adapter
accuracy sasr "$MODEL" runs/online/sasr/adapter
python3 - <<'PY'
import json
def acc(name):
    a = json.load(open(f"runs/online/{name}.accuracy.json"))
    return f"{a['correct']}/{a['examples']} ({100 * a['accuracy']:.0f}%)"
def rollouts(run):
    steps = [json.loads(l) for l in open(f"runs/online/{run}/metrics.jsonl")]
    r = [s for s in steps if s.get("rollout_step") == 1.0]
    if not r:
        return "", ""
    tps = sum(s["rollout/tokens_per_s"] for s in r) / len(r)
    reward = sum(s["rollout/mean_reward"] for s in r) / len(r)
    return f"{len(r)} of {len(steps)} steps, {tps:.0f} tok/s", f"{reward:.3f}"
print("| model | GSM8K dev accuracy (100) | GRPO steps, rollout speed | mean rollout reward |")
print("|---|---|---|---|")
print(f"| base SmolLM2-135M-Instruct | {acc('base')} | | |")
print(f"| + quickstart SFT (15 steps) | {acc('sft')} | | |")
for name, label in [("grpo", "+ quickstart SFT, then GRPO (20 steps)"), ("sasr", "SASR (15 warm-up + 20 mixed steps)")]:
    print(f"| {label} | {acc(name)} | {' | '.join(rollouts(name))} |")
PY
