"""Load a Qwen2 GGUF (llama.cpp's format) as an HF-style config, HF-named tensors and a tokenizer.

    ckpt = load_gguf("model.gguf", dtype=torch.bfloat16)
    for name, tensor in ckpt.tensors.items():   # one tensor dequantized at a time: peak memory ~ one tensor
        ...

Facts this relies on:
- GGUF lists dimensions innermost first (ne[0] = columns), so a torch shape is the reverse: token_embd [896, 151936]
  is (151936, 896).
- llama.cpp's converter permutes q/k rows only for archs with interleaved (GPT-J) rotary, e.g. llama. Qwen2 uses
  the half-split (neox) rotary and is stored unpermuted, so q/k load as they are (test_gguf checks this against
  transformers' own GGUF load).
- Metadata and the tensor table are read by model/gguf_file.py (gguf.GGUFReader spent ~10 s on a Qwen2
  vocabulary); dequantization is the `gguf` package's (maintained with llama.cpp), with faster paths for Q8_0 and
  Q5_0 in model/dequant.py, tensor by tensor, then cast to `dtype`.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType
from tqdm import tqdm

from .dequant import dequantize
from .gguf_file import GGUFFile, GGUFTensorInfo, read_gguf
from .tokenizer import Tokenizer

# Types we dequantize. Floats are converted directly; the rest go through model/dequant.py (numpy, float32 out).
_FLOAT_TYPES = {QT.F32, QT.F16, QT.BF16}
_QUANT_TYPES = {QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K}

# GGUF tensor name -> HF name. {n} is the layer index.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")
# general.sampling.* (llama.cpp's optional sampler defaults) -> generation_config names
_SAMPLING_KEYS = {"temp": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                  "penalty_repeat": "repetition_penalty"}


@dataclass
class GGUFCheckpoint:
    path: str
    config: dict[str, Any]  # HF config.json form
    tensors: "GGUFTensors"  # HF name -> tensor, dequantized lazily
    tokenizer: Tokenizer
    chat_template: str | None
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    file: GGUFFile | None = None  # the parsed file; `tensors` read from its memory map


class GGUFTensors(Mapping):
    """HF-named tensors of a GGUF, dequantized on access. `items()` streams them in file order, with a
    progress bar when asked; `shapes` (torch shapes) and `ggml_types` describe them without dequantizing, e.g. to
    build the model on the meta device first."""

    def __init__(self, path: str, sources: dict[str, GGUFTensorInfo], dtype: torch.dtype, device, progress: bool):
        self.path, self._sources, self.dtype, self.device, self.progress = path, sources, dtype, device, progress
        self.shapes = {name: _torch_shape(t) for name, t in sources.items()}
        self.ggml_types = {name: t.tensor_type.name for name, t in sources.items()}  # "Q4_K", "F32", ...

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._decode(name).to(device=self.device, dtype=self.dtype)

    def _decode(self, name: str) -> torch.Tensor:  # float32 (or wider) on the CPU, in its torch shape
        return _dequantize(self._sources[name]).reshape(self.shapes[name])

    def raw(self, name: str) -> np.ndarray:
        """The tensor's data as the file stores it (read-only memory map; uint8 (rows, row bytes) for block types)."""
        return self._sources[name].data

    def without(self, names) -> "GGUFTensors":
        """The same file with ``names`` left out: what streams when those tensors load another way
        (model/gguf_quant.py keeps projections quantized)."""
        drop = set(names)
        return GGUFTensors(self.path, {n: t for n, t in self._sources.items() if n not in drop}, self.dtype,
                           self.device, self.progress)

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) in file order. The next tensor is dequantized on a second thread while the caller
        copies this one into place (numpy and torch release the GIL): the two overlap on a 2-core CPU. At most two
        dequantized tensors exist at a time. The worker stays on the CPU; the move to `device` happens here, in the
        caller's thread, so its current CUDA device applies."""
        names = list(self._sources)
        bar = tqdm(total=len(names), desc=f"loading {os.path.basename(self.path)}", unit="tensor",
                   disable=not self.progress)
        with bar, ThreadPoolExecutor(max_workers=1, thread_name_prefix="gguf-dequant") as pool:
            ahead = pool.submit(self._decode, names[0]) if names else None
            for i, name in enumerate(names):
                tensor = ahead.result().to(device=self.device, dtype=self.dtype)
                ahead = pool.submit(self._decode, names[i + 1]) if i + 1 < len(names) else None
                yield name, tensor
                del tensor
                bar.update(1)


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu",
              progress: bool = True) -> GGUFCheckpoint:
    """Open a Qwen2 GGUF: config, tokenizer and chat template now, tensors (as `dtype` on `device`) on access.

    Raises FileNotFoundError for a missing file and ValueError for a file that is not a GGUF, is truncated or
    corrupt, is not a qwen2 model, or holds a tensor of an unsupported type or of the wrong shape.
    """
    path = os.fspath(path)
    gguf_file = _open(path)
    meta = _metadata(gguf_file)
    arch = meta.get("general.architecture")
    if arch != "qwen2":
        raise ValueError(f"{path}: general.architecture is {arch!r}; this runtime serves 'qwen2' models only")
    by_name = {t.name: t for t in gguf_file.tensors}
    config = _config(path, meta, by_name)
    sources = _hf_sources(path, by_name, config)
    tokenizer = Tokenizer.from_gguf_metadata(meta)
    defaults = {hf: meta[f"general.sampling.{k}"] for k, hf in _SAMPLING_KEYS.items()
                if f"general.sampling.{k}" in meta}
    return GGUFCheckpoint(path=path, config=config, tensors=GGUFTensors(path, sources, dtype, device, progress),
                          tokenizer=tokenizer, chat_template=meta.get("tokenizer.chat_template"),
                          generation_defaults=defaults, file=gguf_file)


def _open(path: str) -> GGUFFile:
    if not os.path.exists(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    if not os.path.isfile(path):
        raise ValueError(f"{path} is not a file (expected a .gguf file)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file: it starts with {magic!r}, a GGUF starts with b'GGUF'")
    return read_gguf(path)  # a GGUFFormatError (ValueError) names the file and what is wrong with it


def _metadata(gguf_file: GGUFFile) -> dict[str, Any]:
    meta = {}
    for key, value in gguf_file.metadata.items():
        if gguf_file.value_types[key] == (GGUFValueType.FLOAT32,):
            # Stored as float32: 1e-6 reads back as 9.99999997e-07. The shortest float32 repr is the decimal the
            # original config.json had.
            value = float(str(np.float32(value)))
        meta[key] = value
    return meta


def _config(path: str, meta: dict[str, Any], by_name: dict[str, Any]) -> dict[str, Any]:
    def need(key: str):
        if f"qwen2.{key}" not in meta:
            raise ValueError(f"{path}: metadata key qwen2.{key} is missing")
        return meta[f"qwen2.{key}"]

    if "token_embd.weight" not in by_name:
        raise ValueError(f"{path}: tensor token_embd.weight is missing")
    heads = need("attention.head_count")
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": need("embedding_length"),
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get("qwen2.attention.head_count_kv", heads),
        "hidden_act": "silu",
        "rms_norm_eps": meta.get("qwen2.attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": meta.get("qwen2.rope.freq_base", 10000.0),
        "max_position_embeddings": need("context_length"),
        "vocab_size": _torch_shape(by_name["token_embd.weight"])[0],  # embedding rows, not the tokenizer's size
        "tie_word_embeddings": "output.weight" not in by_name,
        "use_sliding_window": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    rope_scaling = _rope_scaling(meta)
    if rope_scaling:
        config["rope_scaling"] = rope_scaling
    return config


def _rope_scaling(meta: dict[str, Any]) -> dict[str, Any] | None:
    """transformers' rope_scaling from llama.cpp's qwen2.rope.scaling.* keys (YaRN: type, factor, original ctx)."""
    kind = meta.get("qwen2.rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling = {"rope_type": kind, "type": kind}  # both spellings: 2024 config.json files use "type"
    if "qwen2.rope.scaling.factor" in meta:
        scaling["factor"] = meta["qwen2.rope.scaling.factor"]
    if "qwen2.rope.scaling.original_context_length" in meta:
        scaling["original_max_position_embeddings"] = meta["qwen2.rope.scaling.original_context_length"]
    for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
        if f"qwen2.rope.scaling.{gguf_key}" in meta:
            scaling[hf_key] = meta[f"qwen2.rope.scaling.{gguf_key}"]
    attn = meta.get("qwen2.rope.scaling.attn_factor", 1.0)
    if attn != 1.0:
        # llama.cpp multiplies this into YaRN's own 0.1*ln(s)+1 scale; convert_hf_to_gguf never writes it for
        # qwen2, and a guessed translation would silently change every logit, so refuse instead.
        raise ValueError(f"qwen2.rope.scaling.attn_factor = {attn} is not supported (only 1.0)")
    return scaling


def _hf_sources(path: str, by_name: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """HF name -> tensor info, in file order, with every shape and type checked before anything loads."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = hidden // config["num_attention_heads"]
    q_out, kv_out = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    expected = {  # HF suffix -> torch shape (nanoGPT-style: assert every weight's shape while loading)
        "self_attn.q_proj.weight": (q_out, hidden), "self_attn.q_proj.bias": (q_out,),
        "self_attn.k_proj.weight": (kv_out, hidden), "self_attn.k_proj.bias": (kv_out,),
        "self_attn.v_proj.weight": (kv_out, hidden), "self_attn.v_proj.bias": (kv_out,),
        "self_attn.o_proj.weight": (hidden, q_out),
        "mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
        "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
        "model.embed_tokens.weight": (config["vocab_size"], hidden), "model.norm.weight": (hidden,),
        "lm_head.weight": (config["vocab_size"], hidden),
    }
    sources = {}
    for name, t in by_name.items():
        hf = hf_name(name, config["num_hidden_layers"])
        if hf is None:
            raise ValueError(f"{path}: tensor {name} is not part of a Qwen2 model (unexpected name)")
        if t.tensor_type not in _FLOAT_TYPES | _QUANT_TYPES:
            raise ValueError(f"{path}: tensor {name} has type {t.tensor_type.name}, which this loader cannot "
                             f"dequantize (supported: {sorted(q.name for q in _FLOAT_TYPES | _QUANT_TYPES)})")
        want = expected.get(hf) or expected[hf.split(".", 3)[3]]
        got = _torch_shape(t)
        if got != want:
            raise ValueError(f"{path}: tensor {name} ({hf}) has shape {got}, expected {want} from the metadata")
        sources[hf] = t
    required = ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.{n}.{suffix}" for n in range(config["num_hidden_layers"]) for suffix in _LAYER_NAMES.values()]
    missing = [n for n in required if n not in sources]
    if missing:
        raise ValueError(f"{path}: {len(missing)} tensors missing, e.g. {missing[:3]}")
    return sources


def hf_name(name: str, num_layers: int) -> str | None:
    """The HF name of GGUF tensor `name` ("blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight"),
    or None when a Qwen2 model of `num_layers` layers has no such tensor."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _LAYER_RE.fullmatch(name)
    if m and int(m.group(1)) < num_layers and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{int(m.group(1))}.{_LAYER_NAMES[m.group(2)]}"
    return None


def _torch_shape(t: GGUFTensorInfo) -> tuple[int, ...]:
    return tuple(reversed(t.dims))  # GGUF ne[0] is the innermost (last torch) dimension


def _dequantize(t: GGUFTensorInfo) -> torch.Tensor:
    """The tensor's values at float32 or better precision, as a fresh (writable) torch tensor, flat."""
    data = t.data  # read-only memmap view of the file
    if t.tensor_type == QT.F32:
        return torch.from_numpy(np.array(data, dtype=np.float32)).flatten()
    if t.tensor_type == QT.F16:
        return torch.from_numpy(np.array(data, dtype=np.float16)).flatten()
    if t.tensor_type == QT.BF16:  # numpy has no bfloat16: reinterpret the raw 16-bit words
        return torch.from_numpy(np.array(data).view(np.int16)).view(torch.bfloat16).flatten()
    return torch.from_numpy(dequantize(data, t.tensor_type)).flatten()
