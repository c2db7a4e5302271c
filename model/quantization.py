"""GPTQ and AWQ checkpoints (config.json ``quantization_config``): the seven projections of every layer arrive
packed (model/quant_gptq.py, model/quant_awq.py); embeddings, norms, biases and lm_head stay dense and load as
usual (model/weights.py). Under tensor parallelism each rank reads the packed projections whole and keeps its slice
(model/quant_shard.py).

Each projection becomes, once at load:
- with ops that run quantized weights (TritonOps: kernels/quant_linear.py), a QuantWeight in the kernel's layout
  in place of the dense parameter; q/k/v and gate/up stay one fused weight (codes, scales and zeros concatenated
  along the output dim), or per-part launches when act-order gave the parts different g_idx;
- otherwise (the torch path, or ``quantization="none"``), the dense weight dequantized to the model dtype, the
  oracle every format runs on.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Iterator

import torch

from qwen2_triton.model.quant_common import IntLinear, QuantConfig

log = logging.getLogger(__name__)

QUANT_LEAVES = ("qweight", "qzeros", "scales", "g_idx")
# checkpoint projection -> (fused parameter, part index); o_proj and down_proj are their own parameter
FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
         "o_proj": ("o_proj", 0), "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
         "down_proj": ("down_proj", 0)}
MODULE = {"qkv_proj": "self_attn", "o_proj": "self_attn", "gate_up_proj": "mlp", "down_proj": "mlp"}
_NAME = re.compile(r"(model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj))\.(\w+)$")
QUANTIZATION_CHOICES = ("auto", "none")


def read_quant_config(model_dir: str) -> QuantConfig | None:
    path = os.path.join(model_dir, "config.json")
    with open(path, encoding="utf-8") as f:
        raw = json.load(f).get("quantization_config")
    return None if raw is None else QuantConfig.from_dict(raw, path)


def projection_names(cfg) -> list[str]:
    """The fused parameters a GPTQ / AWQ checkpoint stores packed: every layer's four projections."""
    return [f"model.layers.{n}.{MODULE[f]}.{f}.weight" for n in range(cfg.num_hidden_layers) for f in MODULE]


def part_shapes(cfg) -> dict[str, tuple[int, int]]:
    """Checkpoint projection -> (in_features, out_features)."""
    h, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def quantized_tensors(model_dir: str, model, tensors: Iterable[tuple[str, torch.Tensor]],
                      quantization: str = "auto") -> Iterator[tuple[str, torch.Tensor]]:
    """Wrap a checkpoint's tensor stream for model/weights.py ``load_into``. Without quantization_config: the
    stream, refusing packed tensors. With it: the projection weights leave ``model.params`` now (load_into then
    expects only the dense ones), their packed tensors are held back from the stream, and when it ends they are
    read, checked and put into ``model.params`` as QuantWeights or dequantized tensors."""
    qc = read_quant_config(model_dir)
    if qc is None:
        return _refuse_packed(tensors, model_dir)
    if quantization not in QUANTIZATION_CHOICES:
        raise ValueError(f"quantization must be one of {QUANTIZATION_CHOICES}, got {quantization!r}")
    for name in projection_names(model.cfg):  # none when the loader deferred them (model/loader.py)
        if model.params.pop(name, None) is not None and torch.device(model.device).type == "cuda":
            torch.cuda.empty_cache()
    keep = quantization == "auto" and getattr(model.ops, "quantized_linear", False)
    return _collect(tensors, model, qc, model_dir, keep)


def _refuse_packed(tensors, source) -> Iterator[tuple[str, torch.Tensor]]:
    for name, t in tensors:
        m = _NAME.match(name)
        if m and m.group(4) in ("qweight", "qzeros"):
            raise ValueError(f"{source}: tensor {name!r} is GPTQ/AWQ-packed but config.json has no "
                             f"quantization_config: the checkpoint's config is incomplete")
        yield name, t


def _collect(tensors, model, qc: QuantConfig, source: str, keep: bool) -> Iterator[tuple[str, torch.Tensor]]:
    held: dict[str, dict[str, torch.Tensor]] = {}  # "model.layers.0.self_attn.q_proj" -> {leaf: tensor}
    for name, t in tensors:
        m = _NAME.match(name)
        if m and m.group(3) in FUSED and m.group(4) in QUANT_LEAVES:
            held.setdefault(m.group(1), {})[m.group(4)] = t
            continue
        if m and m.group(3) in FUSED and m.group(4) == "weight":
            raise ValueError(f"{source}: tensor {name!r} is unquantized, but config.json's quantization_config "
                             f"({qc.describe()}) says every projection is packed (mixed checkpoints are not "
                             f"supported)")
        yield name, t
    build_quantized(model, qc, held, source, keep)


def build_quantized(model, qc: QuantConfig, held: dict, source: str, keep: bool) -> None:
    """Read every projection of ``held`` (whole, also under tensor parallelism) and put the fused weights of this
    rank into model.params."""
    from qwen2_triton.model.quant_awq import read_awq
    from qwen2_triton.model.quant_gptq import read_gptq
    from qwen2_triton.model.quant_shard import shard_int_linear

    reader = read_awq if qc.method == "awq" else read_gptq
    cfg, shapes = model.cfg, part_shapes(model.cfg)
    expected = {f"model.layers.{n}.{'self_attn' if p in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{p}"
                for n in range(cfg.num_hidden_layers) for p in FUSED}
    extra = sorted(set(held) - expected)
    if extra:
        raise ValueError(f"{source}: quantized tensors of modules not in this model: {extra[:4]}")
    missing = sorted(expected - set(held))
    if missing:
        raise ValueError(f"{source}: config.json has quantization_config ({qc.describe()}) but the checkpoint has "
                         f"no packed tensors (qweight, qzeros, scales) for {len(missing)} projection(s), e.g. "
                         f"{missing[0]}.qweight")
    device, dtype, shard = model.device, model.dtype, getattr(model, "shard", None)
    unpackable: list[str] = []  # projections the kernel cannot run in this layout, with why
    for n in range(cfg.num_hidden_layers):
        for fused, module in MODULE.items():
            parts = []
            for proj, (target, _) in FUSED.items():
                if target == fused:
                    name = f"model.layers.{n}.{module}.{proj}"
                    k, out = shapes[proj]
                    t = {leaf: x.to(device) for leaf, x in held.pop(name).items()}
                    part = reader(t, name, k, out, qc, source)
                    parts.append(part if shard is None else shard_int_linear(part, shard, name, source))
            model.params[f"model.layers.{n}.{module}.{fused}.weight"] = \
                _fuse(parts, dtype, keep, f"model.layers.{n}.{module}.{fused}", unpackable)
    if unpackable:
        where = f" (tensor-parallel rank {shard.rank} of {shard.world})" if shard is not None else ""
        log.warning("%s%s: %d projection(s) run dequantized, in a layout the weight-only kernel cannot read: %s",
                    source, where, len(unpackable), "; ".join(unpackable[:3]) + (" ..." if len(unpackable) > 3 else ""))


def _fuse(parts: list[IntLinear], dtype: torch.dtype, keep: bool, name: str, unpackable: list[str]):
    if keep:
        from qwen2_triton.kernels.quant_linear import FusedQuantWeight, pack_quant_weight

        try:
            if all(torch.equal(p.g_idx, parts[0].g_idx) for p in parts):
                return pack_quant_weight(torch.cat([p.codes for p in parts], 1),
                                         torch.cat([p.zeros for p in parts], 1),
                                         torch.cat([p.scales for p in parts], 1), parts[0].g_idx,
                                         parts[0].bits, parts[0].group_size)
            return FusedQuantWeight(tuple(pack_quant_weight(p.codes, p.zeros, p.scales, p.g_idx, p.bits,
                                                            p.group_size) for p in parts))
        except ValueError as e:  # a layout the kernel cannot read: this weight runs dequantized
            unpackable.append(f"{name}: {e}")
    return torch.cat([p.dequantize(dtype) for p in parts])


def is_quantized(weight) -> bool:
    return not isinstance(weight, torch.Tensor)


def describe_checkpoint(model_dir: str, dtype_bytes: int = 2) -> str:
    """One line for ``qwen2-triton env --model``: the quantization and the bytes of weights as stored, and what
    the projections would take dequantized (at ``dtype_bytes`` per element)."""
    from safetensors import safe_open

    from qwen2_triton.model.config import Qwen2Config
    from qwen2_triton.model.weights import safetensors_files

    qc = read_quant_config(model_dir)
    cfg = Qwen2Config.from_file(os.path.join(model_dir, "config.json"))
    stored = packed = 0
    for path in safetensors_files(model_dir):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                nbytes = _numel(sl.get_shape()) * _DTYPE_BYTES.get(sl.get_dtype(), 4)
                stored += nbytes
                m = _NAME.match(name)
                if m and m.group(4) in QUANT_LEAVES:
                    packed += nbytes
    dense = cfg.num_hidden_layers * sum(k * n for k, n in part_shapes(cfg).values()) * dtype_bytes
    if qc is None:
        return f"quantization: none; weights {_size(stored)} as stored"
    return (f"quantization: {qc.describe()}; weights {_size(stored)} as stored, the packed projections "
            f"{_size(packed)} of it ({_size(dense)} dequantized to 16-bit, {dense / max(packed, 1):.1f}x); kernels "
            f"triton: run packed by quant_linear W{qc.bits}A16 (split-K up to 32 rows, tiled above); torch or "
            f"quantization='none': dequantized at load")


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _numel(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def describe_quantization(path: str) -> str:
    """``qwen2-triton env --model PATH``: the quantization line of a checkpoint directory or GGUF file ("" for
    anything else: the shape report names that error)."""
    from qwen2_triton.model.loader import is_gguf_file

    path = os.path.expanduser(path)
    if os.path.isdir(path):
        return describe_checkpoint(path)
    if os.path.isfile(path) and is_gguf_file(path):
        from qwen2_triton.model.gguf_quant import describe_gguf

        return describe_gguf(path)
    return ""
