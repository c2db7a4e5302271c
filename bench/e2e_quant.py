"""bench e2e's quantized rows: batch-1 decode of a weight-only quantized model next to its dense twin.

    qwen2-triton bench e2e --quant-only --quant-model ./Qwen2-7B-Instruct-GPTQ-Int4 [--dense-model ./Qwen2-7B-Instruct]
    qwen2-triton bench e2e --quant-only --models qwen2-7b --quant-random int4,int8

Batch-1 decode is bound by the bytes read per token, and int4 g128 projections stream about 0.28 of their bf16
bytes; issue 11's target is Qwen2-7B int4 at >= 2.2x bf16 decode tokens/s (torchao's int4 weight-only reaches
1.90x bf16 on Llama-3.1-8B / H100, gpt-fast 1.88x on A100: QWEN2_NOTES.md). Two sources of quantized models:
- ``--quant-model PATH``: a GPTQ / AWQ checkpoint directory, loaded as for serving (quantization="auto": packed
  through the Triton kernels on a GPU, dequantized at load on the torch path; ``quant_weights`` says which ran).
  Its twin is ``--dense-model PATH`` (given in the same order) or, by default, random weights in the checkpoint's
  own config: the same shapes, so the same work per token.
- ``--quant-random int4,int4-zeros,int8``: random packed weights (kernels/testing.py random_quant_weight) in the
  release shapes of ``--models``, against random dense ones: the ratio without a checkpoint on disk.
Columns: decode_graph_tok_s / weights_GB / decode_graph_GB_s of the quantized model (packed bytes), the same with
a dense_ prefix for the twin, over_dense (quantized over dense tokens/s) and the target it is read against.
"""
from __future__ import annotations

import json
import logging
import os

import torch

log = logging.getLogger(__name__)

QUANT_RANDOM = {"int4": (4, True), "int4-zeros": (4, False), "int8": (8, True)}  # (bits, symmetric), group 128
TARGETS = {4: "over_dense>=2.2"}  # issue 11: Qwen2-7B int4 batch-1 decode over bf16
PROJECTIONS = ("qkv_proj.weight", "o_proj.weight", "gate_up_proj.weight", "down_proj.weight")


def quant_weights(llm) -> str:
    """What the weights are after loading: packed (run by the weight-only kernels: projections, and a GGUF lm_head
    and embedding) or dense."""
    import torch

    packed = [p for p in llm.model.params.values() if not isinstance(p, torch.Tensor)]  # GPTQ/AWQ/GGUF weights
    return f"packed ({len(packed)} weights)" if packed else "dequantized at load"


def quantize_randomly(model, bits: int, sym: bool, group_size: int) -> list[int]:
    """Replace every layer's projections with random packed weights of their shapes, before LLM(...) captures its
    decode graphs; returns the group sizes used. Tiny shapes take the largest group that divides them."""
    from qwen2_triton.kernels.testing import random_quant_weight

    g = torch.Generator(device=model.device).manual_seed(0)
    used = set()
    for name in [n for n in model.params if n.endswith(PROJECTIONS)]:
        n, k = model.params[name].shape
        group = group_size if k % group_size == 0 else max(d for d in (64, 32, 16) if k % d == 0)
        model.params[name] = random_quant_weight(k, n, bits=bits, group_size=group, sym=sym,
                                                 device=model.device, generator=g)
        used.add(group)
    if torch.device(model.device).type == "cuda":  # the dense projections' memory
        torch.cuda.empty_cache()
    return sorted(used)


def checkpoint_rows(paths: list[str], dense_paths: list[str], *, dtype, device, kw: dict, n_tokens: int,
                    peak: float | None) -> list[dict]:
    from qwen2_triton import LLM
    from qwen2_triton.model.loader import RandomWeights
    from qwen2_triton.model.quantization import read_quant_config

    if len(dense_paths) > len(paths):
        raise ValueError(f"{len(dense_paths)} --dense-model for {len(paths)} --quant-model: they pair in order")
    llm_kw = dict(dtype=dtype, device=device.type, progress=False, **kw)
    rows = []
    for i, path in enumerate(paths):
        qc = read_quant_config(path)
        if qc is None:
            raise ValueError(f"--quant-model {path}: config.json has no quantization_config (not GPTQ/AWQ)")
        row = {"model": os.path.basename(os.path.normpath(path)), "quantization": qc.describe(),
               "target": TARGETS.get(qc.bits, "")}
        _measure(row, "", lambda: LLM(path, **llm_kw), n_tokens, device)
        if i < len(dense_paths):
            row["dense"] = dense_paths[i]
            _measure(row, "dense_", lambda: LLM(dense_paths[i], quantization="none", **llm_kw), n_tokens, device)
        else:
            with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
                cfg = {k: v for k, v in json.load(f).items() if k != "quantization_config"}
            row["dense"] = "random weights, same config"
            _measure(row, "dense_", lambda: LLM(RandomWeights(cfg, row["model"]), **llm_kw), n_tokens, device)
        rows.append(_ratio(row, peak))
    return rows


def random_rows(models: list[str], formats: list[str], *, dtype, device, tiny: bool, kw: dict, n_tokens: int,
                peak: float | None) -> list[dict]:
    from qwen2_triton.bench.e2e import random_llm

    bad = [f for f in formats if f not in QUANT_RANDOM]
    if bad:
        raise ValueError(f"--quant-random {','.join(bad)}: expected some of {','.join(QUANT_RANDOM)}")
    rows = []
    kw = dict(kw, tiny_head_dim=16)  # tiny shapes: the Triton attention's smallest head_dim, for both models
    for name in models:
        dense_row = {"dense": "random weights, same config"}
        _measure(dense_row, "dense_", lambda: random_llm(name, dtype, device, tiny, **kw), n_tokens, device)
        for fmt in formats:
            bits, sym = QUANT_RANDOM[fmt]
            groups = []
            # the packed kernels run on the Triton ops (on CPU: through the interpreter, a smoke test)
            row = {"model": name, "quantization": "", "target": TARGETS.get(bits, "")}
            _measure(row, "", lambda: random_llm(name, dtype, device, tiny, kernels="triton", **kw,
                                                 edit=lambda m: groups.extend(quantize_randomly(m, bits, sym, 128))),
                     n_tokens, device)
            row["quantization"] = f"random int{bits} group {'/'.join(map(str, groups))} {'sym' if sym else 'asym'}"
            rows.append(_ratio({**row, **dense_row}, peak))
    return rows


def _measure(row: dict, prefix: str, make_llm, n_tokens: int, device) -> None:
    """Start an engine, time its decode, and let it go before the next one starts (nothing on one device is freed
    by close(): the last reference must go). The quantized one (no prefix) also says what its projections are."""
    import gc

    from qwen2_triton.bench.e2e import decode_tps, weight_bytes

    llm = make_llm()
    if not prefix:
        row["quant_weights"] = quant_weights(llm)
    row[f"{prefix}decode_graph_tok_s"] = decode_tps(llm, n_tokens, device)
    row[f"{prefix}weights_GB"] = weight_bytes(llm) / 1e9
    row[f"{prefix}decode_graph_GB_s"] = row[f"{prefix}weights_GB"] * row[f"{prefix}decode_graph_tok_s"]
    llm.close()
    del llm
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _ratio(row: dict, peak: float | None) -> dict:
    """The ratios, and the row printed as soon as it is complete (a GPU part may time out before the next)."""
    from qwen2_triton.bench.e2e import print_row

    row["over_dense"] = row["decode_graph_tok_s"] / row["dense_decode_graph_tok_s"]
    if peak:
        row["decode_graph_bw_fraction"] = row["decode_graph_GB_s"] / peak
    print_row(row)
    return row
