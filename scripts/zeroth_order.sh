#!/usr/bin/env bash
# Zeroth-order fine-tuning next to AdamW LoRA on the quickstart recipe
# (examples/quickstart/gsm8k-lora.toml: SmolLM2-135M Q4_1, 400 GSM8K problems, 4 × 256 per step,
# the same data order and seed), each run for STEPS steps with the dev loss every EVERY:
#   lora-adamw         the recipe as it is (LoRA r = 16 on all seven projections, AdamW, cosine)
#   lora-mezo          the same LoRA trained by MeZO-SGD (ε = 1e-2, constant lr, no dropout)
#   full-mezo-offload  full weights of all seven projections by MeZO, offloaded ZO2-style
# and a Markdown table of dev loss against training time (the sum of the steps' step_s; the
# evaluations are left out), with each MeZO run's dev loss beside AdamW's at the same time.
#
#   STEPS=100 EVERY=20 bash scripts/zeroth_order.sh [--table-only]
#
# Runs go to runs/zo/<name>/; the table is printed and written to runs/zo/table.md. Run it on
# an otherwise idle machine: the times are wall-clock measurements.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${STEPS:-100}
every=${EVERY:-20}
mezo_lora_lr=${MEZO_LORA_LR:-1e-3}
mezo_full_lr=${MEZO_FULL_LR:-1e-6}
bin=target/release/ferrotune
mkdir -p runs/zo
if [ "${1:-}" != "--table-only" ]; then
  bash scripts/fetch-model.sh >/dev/null
  cargo build --release --quiet
  run() {
    local name=$1
    shift
    echo "== $name" >&2
    /usr/bin/time -v -o "runs/zo/$name.time" "$bin" train examples/quickstart/gsm8k-lora.toml --overwrite \
      --set output_dir="runs/zo/$name" --set save_steps=0 --set max_steps="$steps" --set eval_steps="$every" "$@" \
      > "runs/zo/$name.log" 2>&1 || { echo "$name: failed, see runs/zo/$name.log" >&2; tail -3 "runs/zo/$name.log" >&2; }
  }
  run lora-adamw
  run lora-mezo --set optimizer=mezo --set zo_eps=1e-2 --set learning_rate="$mezo_lora_lr" \
    --set lr_scheduler=constant --set warmup_steps=0 --set lora_dropout=0.0
  run full-mezo-offload --set adapter=full --set optimizer=mezo --set zo_offload=true --set zo_eps=1e-3 \
    --set learning_rate="$mezo_full_lr" --set lr_scheduler=constant --set warmup_steps=0
fi

python3 - <<'PY' | tee runs/zo/table.md
import json, re
names = ["lora-adamw", "lora-mezo", "full-mezo-offload"]
curves, rss = {}, {}
for n in names:
    try:
        rows = [json.loads(l) for l in open(f"runs/zo/{n}/metrics.jsonl") if l.strip()]
        rss[n] = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(f"runs/zo/{n}.time").read()).group(1)) / 1024
    except Exception:
        continue
    t, pts = 0.0, []
    for r in rows:
        t += r.get("step_s", 0.0)
        if r.get("eval_loss") is not None:
            pts.append((r["step"], t, r["eval_loss"]))
    curves[n] = pts

def at_time(n, t):
    """The dev loss of run n at its last evaluation by training time t."""
    done = [p for p in curves.get(n, []) if p[1] <= t + 1e-9]
    return done[-1] if done else None

print("| run | step | training time (s) | dev loss | AdamW LoRA's dev loss by then (its step) |")
print("|---|---|---|---|---|")
for n in names:
    for step, t, loss in curves.get(n, []):
        ref = at_time("lora-adamw", t) if n != "lora-adamw" else None
        beside = f"{ref[2]:.4f} (step {ref[0]})" if ref else ""
        print(f"| {n} | {step} | {t:.0f} | {loss:.4f} | {beside} |")
print()
print("| run | peak RSS (MiB) |")
print("|---|---|")
for n in names:
    if n in rss:
        print(f"| {n} | {rss[n]:.0f} |")
PY
