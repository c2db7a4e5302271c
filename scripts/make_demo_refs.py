"""Regenerate tests/data/demo_refs.json: HF transformers' prompt ids and greedy tokens on the demo model.

    python scripts/make_demo_refs.py            # needs transformers, accelerate, gguf and the demo extra

HF loads the GGUF itself (its own dequantisation and tokenizer conversion), so it is an independent oracle
for the loader, the tokenizer, the chat template and the graph. float32 on CPU.
"""
from __future__ import annotations

import json
import os
import sys

import torch

RAW = [
    "def quicksort(xs):",
    "The capital of France is",
    "# 计算斐波那契数列\ndef fib(n):",
    "SELECT name, COUNT(*) FROM orders GROUP BY",
]
CHATS = [
    [{"role": "user", "content": "Write a Python function that reverses a string."}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "What is 17 * 23?"}],
    [{"role": "user", "content": "用一句话解释什么是递归。"}],
]
NEW_TOKENS = 16
OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "demo_refs.json")


def main() -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwen2_triton.model.demo import demo_model_path

    path = demo_model_path()
    d, f = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    cases = [{"kind": "raw", "prompt": p} for p in RAW] + [{"kind": "chat", "messages": m} for m in CHATS]
    for c in cases:
        text = c["prompt"] if c["kind"] == "raw" else tok.apply_chat_template(
            c["messages"], tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 eos_token_id=None, pad_token_id=tok.pad_token_id)
        c.update(prompt_ids=ids, greedy_ids=out[0, len(ids):].tolist())
        print(repr(text[-40:]), "->", repr(tok.decode(c["greedy_ids"])), file=sys.stderr)
    with open(OUT, "w", encoding="utf-8") as fh:
        json.dump({"new_tokens": NEW_TOKENS, "dtype": "float32", "cases": cases}, fh, ensure_ascii=False, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
