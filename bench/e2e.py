"""End-to-end GPU benchmark with random weights in the exact shapes of the Qwen2 releases (no download).

    qwen2-triton bench e2e [--models qwen2-0.5b,qwen2-1.5b,qwen2-7b,qwen1.5-4b] [--out CSV]
        [--quant-model GPTQ_DIR [--dense-model DIR]] [--quant-random int4,int4-zeros,int8] [--quant-only]

Per model, in one run: batch-1 decode tokens/s with CUDA graphs and eager, and the bandwidth that implies
(bytes of weights read per token x tokens/s, as gpt-fast reports it); prefill tokens/s at 1k/4k/16k; offline
throughput for 256 requests x (512 prompt, 512 output), with async output (runtime/step_loop.py) as the engine
chose it and off (async_output_x: the overlap's gain; detokenizing is real when $QWEN2_TRITON_TOKENIZER_DIR names
the Qwen tokenizer, as in the GPU kit); and the peer, HF transformers on the same shapes (eager,
and static cache + torch.compile), batch-1 decode. Each row also carries the ratios (graphs over eager, ours over
each peer), decode GB/s as a fraction of the GPU's peak bandwidth (PEAK_GB_S), and the attention tiles the
kernel plan used (tuned, cached or heuristic). Quantized models (bench/e2e_quant.py) add rows of batch-1 decode
next to their dense twin, over_dense being the ratio issue 11 sets at >= 2.2 for int4. ``--tiny`` shrinks every
shape to a smoke test that also runs on CPU. Random weights decode random tokens, which is what a throughput
figure needs: the work per token is the same as for the real checkpoint.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import logging
import os
import time

import torch

log = logging.getLogger(__name__)

# name: (hidden, intermediate, layers, heads, kv heads, vocab rows, tied, rope_theta)
SHAPES = {
    "qwen2-0.5b": (896, 4864, 24, 14, 2, 151936, True, 1e6),
    "qwen2-1.5b": (1536, 8960, 28, 12, 2, 151936, True, 1e6),
    "qwen2-7b": (3584, 18944, 28, 28, 4, 152064, False, 1e6),
    "qwen1.5-4b": (2560, 6912, 40, 20, 20, 151936, False, 5e6),
}


def config_dict(name: str, tiny: bool, tiny_head_dim: int = 8) -> dict:
    """``tiny_head_dim``: 8 for the torch ops; the Triton kernels (quantized rows on CPU) need at least 16."""
    h, i, n, heads, kv, vocab, tied, theta = SHAPES[name]
    if tiny:
        h, i, n, vocab = heads * tiny_head_dim, 64, 2, 1024
    return dict(architectures=["Qwen2ForCausalLM"], hidden_size=h, intermediate_size=i, num_hidden_layers=n,
                num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tied,
                rope_theta=theta, max_position_embeddings=32768, rms_norm_eps=1e-6, head_dim=h // heads)


# Peak memory bandwidth (GB/s, vendor datasheets) by a substring of torch.cuda.get_device_name: decode is
# bandwidth bound, so achieved GB/s over this is the fraction of the hardware limit a decode step reaches.
PEAK_GB_S = [("H200", 4800), ("H100 PCIe", 2000), ("H100 NVL", 3900), ("H100", 3350), ("A100-SXM4-80GB", 2039),
             ("A100 80GB PCIe", 1935), ("A100", 1555), ("L40S", 864), ("L40", 864), ("L4", 300), ("A10", 600),
             ("RTX 4090", 1008), ("RTX 3090", 936)]


def peak_gb_s(gpu_name: str) -> float | None:
    return next((bw for key, bw in PEAK_GB_S if key in gpu_name), None)


class _NoText:
    """Benchmarks feed and read token ids only; the detokenizer still asks for text."""
    eos_token_ids = ()

    def decode(self, ids, skip_special_tokens=False):
        return ""


def random_llm(name: str, dtype, device, tiny: bool, tensor_parallel_size: int = 1, kernels: str = "auto",
               edit=None, tiny_head_dim: int = 8, **kw):
    """``edit(model)``, if given, changes the model before the engine starts (bench/e2e_quant.py packs its
    projections); single process only."""
    from qwen2_triton import LLM

    if tensor_parallel_size > 1:  # every rank draws its own shard (model/loader.py RandomWeights)
        from qwen2_triton.model.loader import RandomWeights

        return LLM(RandomWeights(config_dict(name, tiny), name), dtype=dtype, device=device.type, progress=False,
                   tensor_parallel_size=tensor_parallel_size, **kw)
    from qwen2_triton.model.config import Qwen2Config
    from qwen2_triton.model.loader import LoadedModel
    from qwen2_triton.model.qwen2 import Qwen2Model
    from qwen2_triton.runtime.backend import select_ops

    cfg = Qwen2Config.from_dict(config_dict(name, tiny, tiny_head_dim))
    model = Qwen2Model(cfg, select_ops(kernels, device), dtype, device)
    g = torch.Generator(device=device).manual_seed(0)
    for n, p in model.params.items():
        if n.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0, 0.02, generator=g)
    if edit is not None:
        edit(model)
    return LLM(LoadedModel(model, bench_tokenizer(), {}, (), name), progress=False, **kw)


def bench_tokenizer():
    """The Qwen tokenizer when $QWEN2_TRITON_TOKENIZER_DIR names one (the GPU kit carries it), so the offline run
    detokenizes as serving does; else a stand-in without text."""
    path = os.environ.get("QWEN2_TRITON_TOKENIZER_DIR")
    if not path:
        return _NoText()
    from qwen2_triton.model.tokenizer import Tokenizer

    return Tokenizer.from_dir(path)


def weight_bytes(llm) -> int:
    """Bytes a decode step reads: every parameter (a quantized projection's packed bytes), one embedding row
    aside, unless the embedding is the lm_head (model/qwen2.py ``lm_head_name``)."""
    from qwen2_triton.model.qwen2 import lm_head_name

    P = llm.model.params
    return sum(p.nbytes for n, p in P.items() if n != "model.embed_tokens.weight" or lm_head_name(P) == n)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int = 1) -> float:
    """Seconds of the fastest of ``repeats`` runs after one warm-up."""
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def decode_rate(n_tokens: int, one: float, many: float) -> float:
    """Tokens/s of the decode steps alone: a run of n_tokens + 1 tokens minus a run of 1 (the prefill and
    set-up). A difference of two timings, each a best of 3: when noise exceeds the decode work the difference
    is non-positive, and the row gets NaN with a warning instead of a made-up figure (the benchmark reports its
    own sanity check; it never fails on a busy machine)."""
    if many <= one:
        log.warning("decode timing unusable: %d tokens took %.4f s, 1 token %.4f s; raise --decode-tokens or "
                    "run on a quiet machine (recorded as nan)", n_tokens + 1, many, one)
        return float("nan")
    return n_tokens / (many - one)


def decode_tps(llm, n_tokens: int, device) -> float:
    from qwen2_triton import SamplingParams

    ids = list(range(1, 65))
    one = timed(lambda: llm.generate(ids, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)), device, 3)
    many = timed(lambda: llm.generate(ids, SamplingParams(max_tokens=n_tokens + 1, temperature=0,
                                                          ignore_eos=True)), device, 3)
    return decode_rate(n_tokens, one, many)


def prefill_tps(llm, n: int, device) -> float:
    from qwen2_triton import SamplingParams

    ids = [(7 * j) % 1000 + 1 for j in range(n)]
    return n / timed(lambda: llm.generate(ids, SamplingParams(max_tokens=1, temperature=0)), device)


def offline_tps(llm, n_req: int, prompt: int, output: int, device) -> float:
    from qwen2_triton import SamplingParams

    prompts = [[(13 * r + j) % 1000 + 1 for j in range(prompt)] for r in range(n_req)]
    p = SamplingParams(max_tokens=output, temperature=0.8, seed=0, ignore_eos=True)
    return n_req * output / timed(lambda: llm.generate(prompts, p), device)


def hf_decode_tps(name: str, dtype, device, tiny: bool, n_tokens: int, compiled: bool) -> float:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    c = config_dict(name, tiny)
    model = Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in c.items() if k != "architectures"}))
    model = model.to(device=device, dtype=dtype).eval()
    ids = torch.arange(1, 65, device=device)[None]
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    if compiled:
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        kw["cache_implementation"] = "static"

    def run(k):
        return lambda: model.generate(ids, max_new_tokens=k, min_new_tokens=k, **kw)

    with torch.no_grad():
        one, many = timed(run(1), device, 3), timed(run(n_tokens + 1), device, 3)
    return decode_rate(n_tokens, one, many)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="qwen2-triton bench e2e", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(SHAPES))
    ap.add_argument("--tiny", action="store_true", help="shrunken shapes: a smoke test, also on CPU")
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--prefill", default="1024,4096,16384")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                    help="shard each model over N GPUs (N processes); weights_GB and decode GB/s are then per GPU")
    ap.add_argument("--out", default=None, help="append CSV rows here (e.g. bench/results/e2e.csv)")
    q = ap.add_argument_group("quantized models (bench/e2e_quant.py): batch-1 decode next to the dense twin")
    q.add_argument("--quant-model", action="append", default=[], metavar="DIR",
                   help="a GPTQ/AWQ checkpoint directory (repeatable)")
    q.add_argument("--dense-model", action="append", default=[], metavar="DIR",
                   help="the dense checkpoint of the n-th --quant-model (default: random weights, same config)")
    q.add_argument("--quant-random", default="", metavar="FORMATS",
                   help="random packed weights in the shapes of --models: some of int4,int4-zeros,int8 (group 128)")
    q.add_argument("--quant-only", action="store_true", help="only the quantized rows, not the dense benchmark")
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not a.tiny:
        print("bench/e2e.py measures GPU serving; without CUDA only --tiny (a smoke test) runs")
        return 0
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    import triton

    rows = []
    for name in a.models.split(",") if not a.quant_only else []:
        kw = dict(max_model_len=20000 if not a.tiny else 2048, max_num_seqs=256 if not a.tiny else 8,
                  max_num_batched_tokens=16384 if not a.tiny else 512, tensor_parallel_size=a.tensor_parallel_size)
        graph = random_llm(name, dtype, device, a.tiny, **kw)
        row = {"model": name, "tiny": a.tiny, "tensor_parallel_size": a.tensor_parallel_size, "prefill_tiles": _tiles(graph.plan.prefill),
               "decode_tiles": _tiles(graph.plan.decode)}
        row["decode_graph_tok_s"] = decode_tps(graph, a.decode_tokens, device)
        row["weights_GB"] = weight_bytes(graph) / 1e9
        row["decode_graph_GB_s"] = row["weights_GB"] * row["decode_graph_tok_s"]
        for n in (int(x) for x in a.prefill.split(",")):
            row[f"prefill_{n}_tok_s"] = prefill_tps(graph, min(n, kw["max_num_batched_tokens"]), device)
        offline = (a.requests if not a.tiny else 8, 512 if not a.tiny else 16, 512 if not a.tiny else 16)
        row["offline_out_tok_s"] = offline_tps(graph, *offline, device)
        overlap, graph.loop.overlap = graph.loop.overlap, False  # async output off: outputs between steps
        row["offline_sync_out_tok_s"] = offline_tps(graph, *offline, device)
        graph.loop.overlap = overlap
        row["async_output"] = overlap
        graph.close()  # (tensor parallel: one process group at a time)
        del graph
        eager = random_llm(name, dtype, device, a.tiny, enforce_eager=True, **kw)
        row["decode_eager_tok_s"] = decode_tps(eager, a.decode_tokens, device)
        eager.close()
        del eager
        if not a.no_hf:
            row["hf_eager_tok_s"] = hf_decode_tps(name, dtype, device, a.tiny, a.decode_tokens, compiled=False)
            if device.type == "cuda":
                row["hf_compile_tok_s"] = hf_decode_tps(name, dtype, device, a.tiny, a.decode_tokens, compiled=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        _ratios(row, peak_gb_s(gpu) if device.type == "cuda" else None)
        print_row(row)
        rows.append(row)
    if a.quant_model or a.quant_random:
        rows += _quant_rows(a, dtype, device, peak_gb_s(gpu) if device.type == "cuda" else None)
    if a.out:
        meta = {"date": datetime.date.today().isoformat(), "gpu": gpu, "torch": torch.__version__,
                "triton": triton.__version__}
        append_rows(a.out, [{**meta, **{k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in r.items()}}
                            for r in rows])
    return 0


def print_row(row: dict) -> None:
    print(", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)


def _quant_rows(a, dtype, device, peak: float | None) -> list[dict]:
    from qwen2_triton.bench import e2e_quant

    # One process: the quantized projections do not shard yet (model/quantization.py). Batch-1 decode of a
    # 64-token prompt needs a small KV pool; a fixed one also keeps each engine's start-up from claiming 90% of
    # the GPU while the previous engine's memory is still being returned.
    kw = dict(max_model_len=4096 if not a.tiny else 2048, max_num_seqs=8, max_num_batched_tokens=2048 if not a.tiny
              else 512, kv_cache_tokens=8192 if not a.tiny else 2048)
    common = dict(dtype=dtype, device=device, kw=kw, n_tokens=a.decode_tokens, peak=peak)
    rows = e2e_quant.checkpoint_rows(a.quant_model, a.dense_model, **common)
    if a.quant_random:
        rows += e2e_quant.random_rows(a.models.split(","), a.quant_random.split(","), tiny=a.tiny, **common)
    return rows


def _tiles(result) -> str:
    from qwen2_triton.runtime.tuning import config_label

    return f"{config_label(result.config)} ({result.source})" if result is not None else ""


def _ratios(row: dict, peak: float | None) -> None:
    """The comparisons the figures are read by: graphs over eager, ours over each peer, and the fraction of the
    GPU's memory bandwidth that batch-1 decode reaches."""
    g = row["decode_graph_tok_s"]
    row["graph_over_eager"] = g / row["decode_eager_tok_s"]
    row["async_output_x"] = row["offline_out_tok_s"] / row["offline_sync_out_tok_s"]  # 1 where it is off (CPU)
    for peer in ("hf_eager", "hf_compile"):
        if row.get(f"{peer}_tok_s"):
            row[f"over_{peer}"] = g / row[f"{peer}_tok_s"]
    if peak:
        row["decode_graph_bw_fraction"] = row["decode_graph_GB_s"] / peak


def append_rows(path: str, rows: list[dict]) -> None:
    """Append to a CSV, widening its header when these rows bring new columns (older rows keep blanks)."""
    old, header = [], []
    if os.path.exists(path):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            old, header = list(reader), list(reader.fieldnames or [])
    keys = header + [k for r in rows for k in r if k not in header]
    keys = list(dict.fromkeys(keys))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(old + rows)


if __name__ == "__main__":
    raise SystemExit(main())
