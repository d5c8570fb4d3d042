#!/usr/bin/env bash
# transformers' fp32 copy of the default model, .peers/smollm2-135m-hf, which a few parity tests
# compare with (GGUF loading, the tokenizer, exported tokenizer files). Makes .ci-venv with the
# pinned torch, transformers and gguf-py from PyPI (about 3 GB: the default torch wheel brings
# CUDA libraries, unused here) unless the PyTorch peers' venv is there. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=.peers/smollm2-135m-hf
GGUF=.models/SmolLM2-135M-Instruct.Q4_1.gguf
PKGS=(torch==2.15.0 transformers==5.24.0 accelerate==1.15.0 gguf==0.19.0 safetensors==0.8.0 numpy)
if [ -f "$OUT/model.safetensors" ] && [ -f "$OUT/tokenizer.json" ]; then echo "transformers copy: ok ($OUT)"; exit 0; fi
[ -f "$GGUF" ] || bash scripts/fetch-model.sh
has_transformers() { [ -x "$1" ] && "$1" -c 'import torch, transformers, accelerate, gguf' 2>/dev/null; }
PY=.peers/venv/bin/python
if ! has_transformers "$PY"; then
  PY=.ci-venv/bin/python
  if ! has_transformers "$PY"; then
    [ -x "$PY" ] || python3 -m venv .ci-venv
    echo "transformers copy: installing ${PKGS[*]} into .ci-venv (about 3 GB)"
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q "${PKGS[@]}"
  fi
fi
mkdir -p "$(dirname "$OUT")"
HF_HUB_OFFLINE=1 "$PY" scripts/verify/make_hf_copy.py --gguf "$GGUF" --out "$OUT"
