#!/usr/bin/env bash
# Every method of the registry on the quickstart recipe (examples/quickstart/gsm8k-lora.toml:
# SmolLM2-135M Q4_1, r = 16 on all seven projections, the same steps, data and seed), one run
# after the other, and a Markdown table of: dev eval loss before/after, trainable parameters,
# training tokens/s and peak RSS, the last two also relative to LoRA, and the time the
# method's initialisation took where it is more than a second (data-driven or decomposition
# inits: EVA, CorDA, PiSSA, OLoRA).
#
#   bash scripts/methods_table.sh [METHOD ...]      (default: every method; --set KEY=VALUE passes through)
#   bash scripts/methods_table.sh --table-only [METHOD ...]   (the table from the runs already there)
#
# Runs go to runs/methods/<method>/; the table is printed and written to runs/methods/table.md.
# Run it on an otherwise idle machine: tokens/s are wall-clock measurements.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-model.sh >/dev/null
cargo build --release --quiet
bin=target/release/ferrotune

methods=()
sets=()
table_only=0
while [ $# -gt 0 ]; do
  case "$1" in
    --set) sets+=(--set "$2"); shift 2 ;;
    --table-only) table_only=1; shift ;;
    *) methods+=("$1"); shift ;;
  esac
done
if [ ${#methods[@]} -eq 0 ]; then
  # The registry's names, in its order (`ferrotune methods` lists them).
  mapfile -t methods < <("$bin" methods --names)
fi

mkdir -p runs/methods
for m in "${methods[@]}"; do
  [ "$table_only" = 1 ] && break
  out="runs/methods/$m"
  echo "== $m" >&2
  /usr/bin/time -v -o "runs/methods/$m.time" \
    "$bin" train examples/quickstart/gsm8k-lora.toml --overwrite \
    --set adapter="$m" --set output_dir="$out" --set save_steps=0 "${sets[@]}" \
    > "runs/methods/$m.log" 2>&1 || { echo "$m: failed, see runs/methods/$m.log" >&2; tail -3 "runs/methods/$m.log" >&2; }
done

python3 - "${methods[@]}" <<'EOF' | tee runs/methods/table.md
import json, re, sys
rows = {}
for m in sys.argv[1:]:
    d = f"runs/methods/{m}"
    try:
        run = json.load(open(f"{d}/run.json"))
        metrics = [json.loads(l) for l in open(f"{d}/metrics.jsonl") if l.strip()]
        rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(f"{d}.time").read()).group(1))
    except Exception as e:
        rows[m] = None
        continue
    evals = [x["eval_loss"] for x in metrics if x.get("eval_loss") is not None]
    tps = [x["tokens_per_s"] for x in metrics if x.get("tokens_per_s")]
    # The first step pays one-off costs (allocation, page faults); leave it out of the rate.
    steady = tps[1:] or tps
    init = re.search(r"initialised(?: from \d+ micro-batches \((\d+) examples\))? in ([\d.]+) s", open(f"{d}.log").read())
    rows[m] = dict(before=evals[0], after=evals[-1], params=run["resolved"]["trainable_params"],
                   tps=sum(steady) / len(steady), rss=rss_kib / 1024,
                   init=(f"{float(init.group(2)):.1f} s" + (f" ({init.group(1)} examples)" if init.group(1) else "")) if init else "")
base = rows.get("lora")
print("| method | dev eval loss before → after | trainable params | tokens/s (× LoRA) | peak RSS MiB (× LoRA) | init time |")
print("|---|---|---|---|---|---|")
for m, r in rows.items():
    if r is None:
        print(f"| `{m}` | failed (see runs/methods/{m}.log) | | | | |")
        continue
    rel = lambda k: f" ({r[k] / base[k]:.2f}×)" if base else ""
    print(f"| `{m}` | {r['before']:.4f} → {r['after']:.4f} | {r['params']:,} | {r['tps']:.0f}{rel('tps')} | {r['rss']:.0f}{rel('rss')} | {r['init']} |")
EOF
