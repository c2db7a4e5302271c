"""GGUF projections kept quantized in device memory (issue 11): with ops that run quantized weights (TritonOps) and
``quantization="auto"``, the seven projections of every layer whose GGUF types the kernel reads (Q8_0, Q5_0,
Q4_K, Q6_K) load as kernels/gguf_linear.py weights, repacked from the file's blocks, never dequantized. Everything
else streams through the usual dequantize-at-load path (model/gguf_loader.py -> model/weights.py):
- the torch ops (CPU), ``quantization="none"`` and tensor parallelism (the sharder slices dense tensors): all of it;
- a fused projection (qkv, gate_up) with any part of another type (F16, Q4_0, Q5_K, ...): that whole projection,
  dequantized as before (logged), so one odd tensor costs memory, never correctness;
- the embedding table: dense (a lookup reads one row per token, so its bytes cost memory, not step time).
The lm_head stays quantized too when its type is one the kernel reads: it is the largest weight a decode step
streams (Qwen2-0.5B: 151936 x 896, 272 MB in bf16, more than the 24 layers' kept projections together; the demo's
output.weight is Q8_0, 145 MB). A file without output.weight ties the lm_head to token_embd: the embedding is
then loaded dense for the lookup and the same blocks packed a second time for the lm_head (memory traded for the
bytes every step reads).
The loader asks ``kept_projections`` first and builds Qwen2Model without them, so no dense copy of a kept projection
is ever allocated (the GPTQ / AWQ path does the same).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import torch

from qwen2_triton.model.quantization import QUANTIZATION_CHOICES

log = logging.getLogger(__name__)

KERNEL_TYPES = ("Q8_0", "Q5_0", "Q4_K", "Q6_K")  # kernels/gguf_linear.py FORMATS
# fused parameter -> (module, checkpoint parts in output order)
PROJECTIONS = {"qkv_proj": ("self_attn", ("q_proj", "k_proj", "v_proj")), "o_proj": ("self_attn", ("o_proj",)),
               "gate_up_proj": ("mlp", ("gate_proj", "up_proj")), "down_proj": ("mlp", ("down_proj",))}


LM_HEAD = "lm_head.weight"
EMBEDDING = "model.embed_tokens.weight"


def plan(tensors, num_layers: int) -> tuple[dict[str, list[str]], list[str]]:
    """(fused parameter -> its parts' HF names, for the projections the kernel runs; the others' descriptions).
    The lm_head is one of them when its type (the embedding's, when tied) is one the kernel reads."""
    keep, dense = {}, []
    head = LM_HEAD if LM_HEAD in tensors.ggml_types else EMBEDDING  # no output.weight: tied to token_embd
    if tensors.ggml_types[head] in KERNEL_TYPES:
        keep[LM_HEAD] = [head]
    else:
        dense.append(f"lm_head ({tensors.ggml_types[head]})")
    for n in range(num_layers):
        for fused, (module, parts) in PROJECTIONS.items():
            names = [f"model.layers.{n}.{module}.{p}.weight" for p in parts]
            types = [tensors.ggml_types[x] for x in names]
            if all(t in KERNEL_TYPES for t in types):
                keep[f"model.layers.{n}.{module}.{fused}.weight"] = names
            else:
                dense.append(f"model.layers.{n}.{module}.{fused} ({'+'.join(types)})")
    return keep, dense


def kept_projections(tensors, num_layers: int, ops, quantization: str, tp, source: str) -> dict[str, list[str]]:
    """Fused parameter -> its parts' HF names, for the projections that stay quantized (empty: none do)."""
    if quantization not in QUANTIZATION_CHOICES:
        raise ValueError(f"quantization must be one of {QUANTIZATION_CHOICES}, got {quantization!r}")
    if quantization != "auto" or not getattr(ops, "quantized_linear", False):
        return {}
    if tp is not None:
        log.info("%s: tensor parallel: GGUF projections are dequantized at load (sharding reads dense tensors)",
                 source)
        return {}
    keep, dense = plan(tensors, num_layers)
    if dense:
        log.info("%s: %d projection(s) have a GGUF type the kernel does not read (it reads %s) and are "
                 "dequantized at load: %s", source, len(dense), ", ".join(KERNEL_TYPES), "; ".join(dense[:4]))
    return keep


def gguf_tensor_stream(model, tensors, keep: dict[str, list[str]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensor stream model/weights.py ``load_into`` reads for a GGUF (model/gguf_loader.py GGUFTensors):
    the ``keep`` projections (``kept_projections``; not allocated in ``model.params``) are left out of it and put
    into ``model.params`` as GGUF weights when it ends."""
    if not keep:
        return tensors.items()
    for name in keep:  # a model built without ``defer`` allocated them dense: drop them before load_into looks
        if model.params.pop(name, None) is not None and torch.device(model.device).type == "cuda":
            torch.cuda.empty_cache()
    held = [x for names in keep.values() for x in names if x != EMBEDDING]  # a tied embedding also loads dense
    return _stream(tensors, held, keep, model)


def _stream(tensors, held, keep, model):
    yield from tensors.without(held).items()
    for name, parts in keep.items():
        model.params[name] = build(tensors, parts).to(model.device)


def build(tensors, names: list[str]):
    """The GGUF weight of one fused projection from its parts' raw blocks (in output order)."""
    from qwen2_triton.kernels.gguf_linear import fuse_gguf, pack_gguf_weight
    from qwen2_triton.model.gguf_blocks import unpack_blocks

    parts = []
    for x in names:
        fields = unpack_blocks(tensors.raw(x), tensors.ggml_types[x])
        w = pack_gguf_weight(**fields.__dict__)
        if (w.out_features, w.in_features) != tuple(tensors.shapes[x]):  # gguf_loader checked the shapes
            raise ValueError(f"{tensors.path}: {x} unpacked to {(w.out_features, w.in_features)}, expected "
                             f"{tuple(tensors.shapes[x])}")
        parts.append(w)
    return fuse_gguf(parts)


def describe_gguf(path: str, dtype_bytes: int = 2) -> str:
    """The quantization line of ``qwen2-triton env --model FILE.gguf``: the types and bytes of the projections as
    stored, what the kernel layout keeps on the GPU, and what runs dequantized."""
    from qwen2_triton.kernels.gguf_linear import FORMATS, NATIVE_BPW
    from qwen2_triton.model.gguf_loader import load_gguf

    g = load_gguf(path, progress=False)
    layers = g.config["num_hidden_layers"]
    keep, dense = plan(g.tensors, layers)
    kept = [x for names in keep.values() for x in names]
    counts: dict[str, int] = {}
    stored = gpu = values = 0
    for x in kept:
        qtype = g.tensors.ggml_types[x]
        counts[qtype] = counts.get(qtype, 0) + 1
        n = 1
        for s in g.tensors.shapes[x]:
            n *= s
        values += n
        stored += round(n * NATIVE_BPW[qtype] / 8)
        gpu += round(n * FORMATS[qtype].bits_per_weight / 8)
    types = ", ".join(f"{q} x{c}" for q, c in sorted(counts.items()))
    head = "the lm_head among them" if LM_HEAD in keep else "the lm_head dequantized"
    return (f"quantization: GGUF, {_size(os.path.getsize(path))} as stored; kernels triton: {len(kept)} projection "
            f"tensors ({types}; {head}) run quantized by gguf_linear: {_size(stored)} in the file, {_size(gpu)} in "
            f"the kernel layout ({_size(values * dtype_bytes)} dequantized to 16-bit); {len(dense)} projection(s) "
            f"of other types and the embedding dequantized at load; torch or quantization='none': all dequantized "
            f"at load")


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
