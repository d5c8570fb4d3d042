"""Checks ferrotune's Qwen2 path against transformers on the same GGUF file.

transformers reads the GGUF itself (`gguf_file=`): it dequantizes every tensor to f32 and builds
its own tokenizer from the file's metadata. Both sides then tokenize the same texts and compute
the next-token logits of every position. Reports per text: whether the token ids are equal, the
max absolute logit difference, the max |logit| for scale, and the top-1 agreement over positions.

    bash scripts/fetch-qwen.sh 0.5b && cargo build --release
    .peers/venv/bin/python scripts/verify/qwen2_logits.py [--model .models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf]

Exit status 1 when the ids differ or a text's logits differ by more than --tol.
"""
import argparse, json, subprocess, sys, tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
TEXTS = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "<|im_start|>user\nWrite a haiku about Rust's borrow checker.<|im_end|>\n<|im_start|>assistant\n",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. 你好，世界！ 12345",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / ".models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"))
    ap.add_argument("--ferrotune", default=str(ROOT / "target/release/ferrotune"))
    # Both sides dequantize the same blocks to f32; what remains is f32 summation order over
    # the layers (measured on the 0.5B: at most 3.1e-4 on logits of about 25).
    ap.add_argument("--tol", type=float, default=2e-3)
    args = ap.parse_args()
    gguf = Path(args.model).resolve()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
    model.eval()
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for i, text in enumerate(TEXTS):
            out = Path(tmp) / f"l{i}.json"
            subprocess.run([args.ferrotune, "logits", "--model", str(gguf), "--text", text, "--out", str(out)], check=True, stderr=subprocess.DEVNULL)
            ours = json.loads(out.read_text())
            theirs_ids = tok(text)["input_ids"]
            same_ids = ours["ids"] == theirs_ids
            with torch.no_grad():
                ref = model(torch.tensor([ours["ids"]])).logits[0].numpy()
            mine = np.asarray(ours["logits"], dtype=np.float32)
            diff = float(np.abs(mine - ref).max())
            top1 = float((mine.argmax(-1) == ref.argmax(-1)).mean())
            ok = same_ids and diff <= args.tol
            failed |= not ok
            print(json.dumps({"text": i, "tokens": len(ours["ids"]), "same_ids": same_ids, "max_abs_diff": diff,
                              "max_abs_logit": float(np.abs(ref).max()), "top1_agreement": top1, "ok": ok}))
            if not same_ids:
                print(f"  ferrotune:    {ours['ids']}\n  transformers: {theirs_ids}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
