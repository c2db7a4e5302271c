"""CPU decode benchmark: batch-1 float32 decode tokens/s of the demo model, qwen2-triton vs HF transformers.

    qwen2-triton bench cpu-decode [--model PATH] [--tokens 64] [--repeats 3] [--no-hf] [--out bench/results/cpu_decode.csv]

Decode rate = N / (time(prompt + N+1 tokens) - time(prompt + 1 token)): the prefill and the first token cancel
out, as in Qwen's own speed benchmark. Both engines run greedy, ignore EOS, on the same GGUF, in this process,
with the same torch thread count. Achieved bandwidth = bytes of weights read per token x tokens/s.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import time

import torch

PROMPT = "def quicksort(xs):\n    \"\"\"Sort a list of numbers.\"\"\"\n"


def _best(fn, repeats: int) -> float:
    fn()  # warm-up
    return min(_timed(fn) for _ in range(repeats))


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def ours(model: str | None, n: int, repeats: int) -> tuple[float, float]:
    from qwen2_triton import LLM, SamplingParams

    llm = LLM(model, dtype="float32", device="cpu", progress=False, max_model_len=4096)
    ids = llm.tokenizer.encode(PROMPT)

    def run(k):
        return lambda: llm.generate(ids, SamplingParams(max_tokens=k, temperature=0, ignore_eos=True))

    t1, tn = _best(run(1), repeats), _best(run(n + 1), repeats)
    weight_bytes = sum(p.numel() * p.element_size() for name, p in llm.model.params.items()
                       if name != "model.embed_tokens.weight" or llm.model.cfg.tie_word_embeddings)
    return n / (tn - t1), weight_bytes


def hf(model: str | None, n: int, repeats: int) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwen2_triton.model.demo import demo_model_path

    path = model or demo_model_path()
    kw = {"gguf_file": os.path.basename(path)} if os.path.isfile(path) else {}
    root = os.path.dirname(path) if os.path.isfile(path) else path
    tok = AutoTokenizer.from_pretrained(root, **kw)
    m = AutoModelForCausalLM.from_pretrained(root, dtype=torch.float32, **kw).eval()
    ids = torch.tensor([tok(PROMPT, add_special_tokens=False)["input_ids"]])

    def run(k):
        def go():
            with torch.no_grad():
                m.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=tok.pad_token_id)
        return go

    t1, tn = _best(run(1), repeats), _best(run(n + 1), repeats)
    return n / (tn - t1)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"{platform.machine()} x{os.cpu_count()}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="qwen2-triton bench cpu-decode", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the demo model")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-hf", action="store_true", help="skip the HF transformers peer")
    ap.add_argument("--out", default=None, help="append a CSV row here (e.g. bench/results/cpu_decode.csv)")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    tps, wbytes = ours(a.model, a.tokens, a.repeats)
    hf_tps = None if a.no_hf else hf(a.model, a.tokens, a.repeats)
    gbs = wbytes * tps / 1e9
    print(f"qwen2-triton  float32 batch-1 decode: {tps:6.2f} tok/s  ({gbs:.1f} GB/s of weights read)")
    if hf_tps:
        print(f"HF transformers eager                : {hf_tps:6.2f} tok/s")
        print(f"ratio                                : {tps / hf_tps:6.2f}x")
    if a.out:
        new = not os.path.exists(a.out)
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["date", "cpu", "threads", "torch", "model", "tokens", "ours_tok_s", "hf_tok_s", "ratio",
                            "weights_GB_s"])
            w.writerow([datetime.date.today().isoformat(), cpu_name(),
                        torch.get_num_threads(), torch.__version__, a.model or "demo (Qwen2.5-Coder-0.5B Q4_K_M)",
                        a.tokens, f"{tps:.2f}", f"{hf_tps:.2f}" if hf_tps else "", 
                        f"{tps / hf_tps:.2f}" if hf_tps else "", f"{gbs:.1f}"])
    return 0


