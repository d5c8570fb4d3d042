"""Eval loss of a base model + LoRA adapter in Hugging Face PEFT, computed the way
`ferrotune eval` computes it for `{"text": ...}` records: `tokenizer(text)`, every predicted
token is a target, the loss is the token-weighted mean NLL over the whole file.

    .peers/venv/bin/python scripts/verify/peft_eval.py --model .peers/smollm2-135m-hf \
        --adapter runs/quickstart/adapter --data FILE.jsonl

--model may also be a .gguf file, which transformers dequantizes to f32 (and builds the
tokenizer from), as it reads the Qwen2.5 GGUFs of scripts/fetch-qwen.sh.

Prints one JSON line {"loss", "tokens", "perplexity"} like `ferrotune eval`.
"""
import argparse, json, math
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--adapter")
ap.add_argument("--data", required=True)
args = ap.parse_args()

torch.set_num_threads(2)
if args.model.endswith(".gguf"):
    where = {"pretrained_model_name_or_path": str(Path(args.model).resolve().parent), "gguf_file": Path(args.model).name}
else:
    where = {"pretrained_model_name_or_path": args.model}
tok = AutoTokenizer.from_pretrained(**where)
model = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
if args.adapter:
    model = PeftModel.from_pretrained(model, args.adapter)
model.eval()

total, count = 0.0, 0
with open(args.data) as f, torch.no_grad():
    for line in f:
        if not line.strip():
            continue
        ids = tok(json.loads(line)["text"], return_tensors="pt").input_ids
        logits = model(input_ids=ids).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
        total += nll.item()
        count += ids.shape[1] - 1
print(json.dumps({"loss": total / count, "tokens": count, "perplexity": math.exp(total / count)}))
