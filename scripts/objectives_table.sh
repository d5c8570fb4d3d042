#!/usr/bin/env bash
# The offline objectives against SFT on the quickstart recipe (examples/quickstart/gsm8k-lora.toml:
# SmolLM2-135M Q4_1, LoRA r = 16 on all seven projections, 15 steps of 4 GSM8K problems, the same
# data and seed): a Markdown table of the dev eval loss (the plain token NLL on the 50 held-out
# problems, the same measure for every objective) before and after, and training tokens/s.
#
#   bash scripts/objectives_table.sh [OBJECTIVE ...]   (default: sft dft asft masked_thought ift)
#
# Runs go to runs/objectives/<objective>/; the table is printed and written to
# runs/objectives/table.md. Tokens/s are wall-clock: run it on an otherwise idle machine.
# FERROTUNE=path runs another binary.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-model.sh >/dev/null
FT=${FERROTUNE:-target/release/ferrotune}
[ -n "${FERROTUNE:-}" ] || cargo build --release --quiet
objectives=("$@")
[ ${#objectives[@]} -gt 0 ] || objectives=(sft dft asft masked_thought ift)
mkdir -p runs/objectives
for o in "${objectives[@]}"; do
  echo "== $o" >&2
  "$FT" train examples/quickstart/gsm8k-lora.toml --overwrite --set objective="$o" \
    --set output_dir="runs/objectives/$o" | tail -1 > "runs/objectives/$o.summary.json"
done
python3 - "${objectives[@]}" <<'PY' | tee runs/objectives/table.md
import json, sys
sft = None
print("| objective | dev loss before | dev loss after | change vs SFT's | training tokens/s |")
print("|---|---|---|---|---|")
for o in sys.argv[1:]:
    s = json.load(open(f"runs/objectives/{o}.summary.json"))
    drop = s["eval_loss_before"] - s["eval_loss_after"]
    if o == "sft":
        sft = drop
    rel = f"{drop / sft:.2f}× the drop" if sft and o != "sft" else ""
    print(f"| `{o}` | {s['eval_loss_before']:.4f} | {s['eval_loss_after']:.4f} | {rel} | {s['tokens_per_s']:.1f} |")
PY
