#!/usr/bin/env python3
"""llama.cpp's single-stream decode speed on a GGUF, through llama-cpp-python: the yardstick of
`ferrotune bench --generate`.

Greedy completions of a fixed GSM8K prompt: the time of a 1-token completion (prompt
processing and the first token) is subtracted from that of an N-token one, so the rate counts
decode steps only. Best of 3.

Usage: python llama_cpp_decode.py MODEL.gguf [NEW_TOKENS=128] [THREADS=2]
(llama-cpp-python built from source; on a CPU where its native build crashes, build it with
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON".)
"""
import sys
import time

import llama_cpp

path = sys.argv[1]
n_new = int(sys.argv[2]) if len(sys.argv) > 2 else 128
threads = int(sys.argv[3]) if len(sys.argv) > 3 else 2
llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False)
prompt = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May? Let us think step by step about this problem and"
)


def completion_seconds(max_tokens):
    llm.reset()
    t0 = time.perf_counter()
    r = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0)
    return time.perf_counter() - t0, r["usage"]["completion_tokens"]


rates = []
for rep in range(3):
    first, _ = completion_seconds(1)
    total, got = completion_seconds(n_new)
    rates.append((got - 1) / (total - first))
    print(f"run {rep + 1}: {got} tokens, {rates[-1]:.1f} decode tokens/s", flush=True)
print(f"llama.cpp {llama_cpp.__version__} single-stream decode: {max(rates):.1f} tokens/s (best of 3, {threads} threads)")
