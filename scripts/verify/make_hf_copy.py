#!/usr/bin/env python3
"""transformers' own fp32 copy of a GGUF model, for ferrotune's parity tests.

transformers reads the GGUF (dequantizing its blocks with gguf-py and undoing llama.cpp's
Q/K row permutation), and the model and tokenizer are saved as a Hugging Face folder. The tests
then compare ferrotune's GGUF loading, tokenizer and tokenizer-file export with what
transformers made, independently of ferrotune's code.

Usage: python make_hf_copy.py --gguf .models/SmolLM2-135M-Instruct.Q4_1.gguf --out .peers/smollm2-135m-hf
The folder is written under a temporary name and renamed when complete.
"""
import argparse
import os
import shutil
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", required=True, help="the GGUF file")
    ap.add_argument("--out", required=True, help="the Hugging Face folder to write")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(args.gguf))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The config of a GGUF load names its quantization; the copy holds plain fp32 weights, so it
    # is rebuilt from a config without it and given the loaded weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        sys.exit(f"make_hf_copy: the rebuilt model does not take the loaded weights (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    for (a, x), (b, y) in zip(loaded.state_dict().items(), model.state_dict().items()):
        if a != b or not torch.equal(x, y):
            sys.exit(f"make_hf_copy: tensor {a} differs after the rebuild")

    partial = args.out.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(args.out, ignore_errors=True)
    os.rename(partial, args.out)
    print(f"transformers' copy of {args.gguf} written to {args.out}")


if __name__ == "__main__":
    main()
