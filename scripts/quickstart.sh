#!/usr/bin/env bash
# The quickstart: fetch the default model, build, and fine-tune it on the bundled GSM8K sample.
# Prints the dev-set eval loss before and after training.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "quickstart: needs a Rust toolchain (https://rustup.rs)" >&2; exit 1; }
bash scripts/fetch-model.sh
cargo build --release
# The quickstart is a demo: running it again starts its run again (--overwrite replaces only the
# earlier quickstart run's files), unless asked to --resume it.
case " $* " in
  *" --resume "*) target/release/ferrotune train examples/quickstart/gsm8k-chat-lora.toml "$@" ;;
  *) target/release/ferrotune train examples/quickstart/gsm8k-chat-lora.toml --overwrite "$@" ;;
esac
