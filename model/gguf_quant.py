"""GGUF tensors kept quantized in device memory (issue 11): with ops that run quantized weights (TritonOps) and
``quantization="auto"``, the seven projections of every layer whose GGUF types the kernels read (``KERNEL_TYPES``)
load as kernels/gguf_linear.py weights, repacked from the file's blocks, never dequantized. Everything else streams
through the usual dequantize-at-load path (model/gguf_loader.py -> model/weights.py):
- the torch ops (CPU) and ``quantization="none"``: all of it;
- a fused projection (qkv, gate_up) with any part of another type (F16, Q3_K, IQ4_NL, ...): that whole projection,
  dequantized as before (logged), so one odd tensor costs memory, never correctness.
The lm_head and the embedding table stay quantized too when their types are ones the kernels read. The lm_head is
the largest weight a decode step streams (Qwen2-0.5B: 151936 x 896, 272 MB in bf16, more than the 24 layers' kept
projections together; the demo's output.weight is Q8_0, 145 MB). The table is looked up row by row from its blocks
(kernels/gguf_embedding.py): it costs memory, not step time, and Qwen2-7B's Q4_K token_embd takes 0.32 GB instead
of 1.09 GB. A file without output.weight ties the lm_head to token_embd: the one packed table serves both.
Under tensor parallelism each rank packs its slice of the raw blocks (``rank_fields``): rows for the
column-parallel projections, the input columns of o_proj and down_proj. A row-parallel slice may start and end
inside a K-quant's 256-value super-block (Qwen2-0.5B's down_proj at 2 ranks: 2432 = 9.5 x 256 columns a rank):
it keeps the partial super-blocks' d and dmin and its offset in the first (GGUFWeight.k_offset). Only a slice
that cuts a 32-value sub-block (16 for Q6_K) would be dequantized: none of Qwen2-0.5B/1.5B/7B's does at the
rank counts their heads allow.
The embedding and lm_head are vocab-parallel and dense there.
The loader asks ``kept_projections`` first and builds Qwen2Model without them, so no dense copy of a kept projection
is ever allocated (the GPTQ / AWQ path does the same).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import torch

from qwen2_triton.kernels.gguf_linear import FORMATS
from qwen2_triton.model.quantization import QUANTIZATION_CHOICES

log = logging.getLogger(__name__)

KERNEL_TYPES = tuple(FORMATS)  # the GGUF types kernels/gguf_linear.py reads
# fused parameter -> (module, checkpoint parts in output order)
PROJECTIONS = {"qkv_proj": ("self_attn", ("q_proj", "k_proj", "v_proj")), "o_proj": ("self_attn", ("o_proj",)),
               "gate_up_proj": ("mlp", ("gate_proj", "up_proj")), "down_proj": ("mlp", ("down_proj",))}


LM_HEAD = "lm_head.weight"
EMBEDDING = "model.embed_tokens.weight"


def plan(tensors, num_layers: int, shard=None) -> tuple[dict[str, list[str]], list[str]]:
    """(fused parameter -> its parts' HF names, for the tensors the kernels run from their blocks; the others'
    descriptions). The embedding table and the lm_head are among them when their types are ones the kernel reads,
    without tensor parallelism; a tied lm_head (no output.weight) is the table itself (model/qwen2.py ``lm_head``).
    ``shard``: a tensor-parallel rank (model/sharding.py TPShard), whose slices must be whole sub-blocks."""
    keep, dense = {}, []
    ends = [EMBEDDING] + ([LM_HEAD] if LM_HEAD in tensors.ggml_types else [])
    for name in ends:
        qtype = tensors.ggml_types[name]
        if shard is None and qtype in KERNEL_TYPES:
            keep[name] = [name]
        else:
            dense.append(f"{name.split('.')[-2]} ({qtype}{', vocab-parallel' if shard is not None else ''})")
    for n in range(num_layers):
        for fused, (module, parts) in PROJECTIONS.items():
            names = [f"model.layers.{n}.{module}.{p}.weight" for p in parts]
            types = [tensors.ggml_types[x] for x in names]
            label = f"model.layers.{n}.{module}.{fused} ({'+'.join(types)}"
            if not all(t in KERNEL_TYPES for t in types):
                dense.append(label + ")")
            elif shard is not None and not all(_splits_cleanly(shard, x, t) for x, t in zip(names, types)):
                dense.append(label + f": rank {shard.rank}'s slice of the input dim cuts a sub-block)")
            else:
                keep[f"model.layers.{n}.{module}.{fused}.weight"] = names
    return keep, dense


def _splits_cleanly(shard, name: str, qtype: str) -> bool:
    """This rank's slice of the input dim starts and ends on whole sub-blocks (32 values; Q6_K's 16), so each of
    its values has its own scales: a slice may start inside a K-quant's 256-value super-block (``rank_fields``)."""
    split = shard.split_of(name)
    if split is None or split[0] == 0:  # replicated, or rows (output features): any rows are whole blocks
        return True
    unit = FORMATS[qtype].sub_rows
    return split[1] % unit == 0 and split[2] % unit == 0


def rank_fields(raw, qtype: str, shard, name: str):
    """(BlockFields of this rank's part of one tensor, its k_offset). The raw blocks (uint8 (N, row bytes)) are
    sliced before unpacking, so a rank unpacks its share only: rows for a column-parallel projection; for a
    row-parallel one the blocks covering its input columns, then the fields trimmed to them. A slice starting
    inside a K-quant super-block keeps that block's d (and dmin) and says where it starts (GGUFWeight.k_offset)."""
    from dataclasses import replace

    from qwen2_triton.model.gguf_blocks import BLOCK_BYTES, unpack_blocks

    split = shard.split_of(name) if shard is not None else None
    if split is None:
        return unpack_blocks(raw, qtype), 0
    dim, start, stop, _ = split
    if dim == 0:
        return unpack_blocks(raw[start:stop], qtype), 0
    nbytes, values = BLOCK_BYTES[qtype]
    first, end = start // values, -(-stop // values)
    fields = unpack_blocks(raw[:, first * nbytes: end * nbytes], qtype)
    skip, length = start - first * values, stop - start
    if skip == 0 and length == (end - first) * values:
        return fields, 0
    per = {"codes": 1, "sub": FORMATS[qtype].sub_rows, "sub_min": 32}  # input values per column of each field
    return replace(fields, **{f: getattr(fields, f)[:, skip // n: (skip + length) // n]
                              for f, n in per.items() if getattr(fields, f) is not None}), skip


def kept_projections(tensors, num_layers: int, ops, quantization: str, shard,
                     source: str) -> dict[str, list[str]]:
    """Fused parameter -> its parts' HF names, for the projections that stay quantized (empty: none do).
    ``shard``: this tensor-parallel rank (TPShard), or None."""
    if quantization not in QUANTIZATION_CHOICES:
        raise ValueError(f"quantization must be one of {QUANTIZATION_CHOICES}, got {quantization!r}")
    if quantization != "auto" or not getattr(ops, "quantized_linear", False):
        return {}
    keep, dense = plan(tensors, num_layers, shard)
    if dense:
        log.info("%s: %d tensor(s) are dequantized at load (the kernels read %s): %s", source, len(dense),
                 ", ".join(KERNEL_TYPES), "; ".join(dense[:4]))
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
    held = [x for names in keep.values() for x in names]
    return _stream(tensors, held, keep, model)


def _stream(tensors, held, keep, model):
    yield from tensors.without(held).items()
    for name, parts in keep.items():
        model.params[name] = build(tensors, parts, getattr(model, "shard", None)).to(model.device)


def build(tensors, names: list[str], shard=None):
    """The GGUF weight of one fused projection from its parts' raw blocks (in output order); this rank's slice of
    each part under tensor parallelism."""
    from qwen2_triton.kernels.gguf_linear import fuse_gguf, pack_gguf_weight

    parts = []
    for x in names:
        fields, k_offset = rank_fields(tensors.raw(x), tensors.ggml_types[x], shard, x)
        if shard is None and tuple(fields.codes.shape) != tuple(tensors.shapes[x]):  # gguf_loader checked the shapes
            raise ValueError(f"{tensors.path}: {x} unpacked to {tuple(fields.codes.shape)}, expected "
                             f"{tuple(tensors.shapes[x])}")
        parts.append(pack_gguf_weight(**fields.__dict__, k_offset=k_offset))
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
    tied = LM_HEAD not in g.tensors.ggml_types
    ends = " and ".join(x for x, name in (("the embedding" + (" (the tied lm_head)" if tied else ""), EMBEDDING),
                                          ("lm_head", LM_HEAD)) if name in keep)
    return (f"quantization: GGUF, {_size(os.path.getsize(path))} as stored; kernels triton: {len(kept)} tensors "
            f"({types}; {ends or 'no embedding or lm_head'} among them) run from their blocks by the GGUF kernels: "
            f"{_size(stored)} in the file, {_size(gpu)} in the kernel layout ({_size(values * dtype_bytes)} "
            f"dequantized to 16-bit); {len(dense)} of other types dequantized at load"
            f"{': ' + ', '.join(dense[:3]) if dense else ''}; torch or quantization='none': all dequantized at load")


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
