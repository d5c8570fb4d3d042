#!/usr/bin/env bash
# Long fuzzing run of every parser of user files (GGUF, safetensors, config.json,
# tokenizer.json and tokenizer_config.json, GGUF tokenizer metadata, chat templates, PEFT
# adapters, run plans with --set, JSONL datasets): 10^6 cases per parser by default.
# Prints per parser the cases run, how many parsed (ok), how many were refused with an error,
# and every failure (panic, slow case, oversized allocation) with the command reproducing it.
#
#   bash scripts/fuzz.sh [--cases N] [--seed S] [--only PARSER]
#
# Seeds include the first 64 KiB of .models/SmolLM2-135M-Instruct.Q4_1.gguf when it has been
# fetched (scripts/fetch-model.sh). Exits non-zero if any case failed. A case takes 0.2-2 ms,
# so the default 10^6 per parser is a few hours on two cores; --only runs one parser.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "fuzz: needs a Rust toolchain (https://rustup.rs)" >&2; exit 1; }
args=("$@")
if [[ " $* " != *" --cases "* ]]; then
    args=(--cases "${FERROTUNE_FUZZ_CASES:-1000000}" "${args[@]}")
fi
cargo build --release --example fuzz
exec target/release/examples/fuzz "${args[@]}"
