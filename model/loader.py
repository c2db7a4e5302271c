"""One entry point from a user's path to a loaded model, tokenizer and generation defaults.

A path is either a Hugging Face checkpoint directory (config.json, safetensors, tokenizer.json) or a GGUF
file; which one is decided by what is on disk (a directory, or a file starting with the GGUF magic), never by
the name.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import torch

from qwen2_triton.model.config import Qwen2Config
from qwen2_triton.model.quantization import projection_names, quantized_tensors, read_quant_config
from qwen2_triton.model.qwen2 import Qwen2Model
from qwen2_triton.model.sharding import TPShard, iter_safetensors_shard, shard_tensors
from qwen2_triton.model.weights import iter_safetensors, load_into, safetensors_files

# generation_config.json keys that become SamplingParams defaults (vLLM's convention)
GENERATION_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                   "repetition_penalty": "repetition_penalty", "min_p": "min_p", "max_new_tokens": "max_tokens"}


@dataclass
class LoadedModel:
    model: Qwen2Model
    tokenizer: object  # model.tokenizer.Tokenizer
    generation_defaults: dict = field(default_factory=dict)
    eos_token_ids: tuple[int, ...] = ()
    source: str = ""


@dataclass(frozen=True)
class RandomWeights:
    """A model of the config.json dict ``config`` with random weights (N(0, std); norm weights 1): what a
    throughput benchmark needs, the work per token of the real checkpoint without a download. Unlike a
    LoadedModel it is a recipe, not memory, so every tensor-parallel rank can draw its own shard of it."""
    config: dict
    name: str = "random"
    seed: int = 0
    std: float = 0.02


class NoTextTokenizer:
    """RandomWeights decode random token ids; the detokenizer still asks for text."""
    eos_token_ids = ()

    def decode(self, ids, skip_special_tokens=False):
        return ""


def is_gguf_file(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def load_model(path: str, dtype: torch.dtype, device: torch.device, ops, progress: bool = True,
               quantization: str = "auto",
               tp=None) -> LoadedModel:
    """tp: runtime/parallel_state.py TensorParallel: load only this rank's slices (model/sharding.py)."""
    if isinstance(path, RandomWeights):
        return _random(path, dtype, device, ops, tp)
    path = _existing(path)
    if os.path.isdir(path):
        return _load_hf_dir(path, dtype, device, ops, progress, quantization, tp)
    if is_gguf_file(path):
        return _load_gguf(path, dtype, device, ops, progress, quantization, tp)
    raise ValueError(f"{path} is neither a checkpoint directory (config.json + safetensors) nor a GGUF file")


def read_config(path: str) -> Qwen2Config:
    """The model's config alone, without a weight (a GGUF's metadata is parsed, its tensors are not read)."""
    if isinstance(path, RandomWeights):
        return Qwen2Config.from_dict(path.config, source=path.name)
    path = _existing(path)
    if os.path.isdir(path):
        return Qwen2Config.from_file(os.path.join(path, "config.json"))
    if is_gguf_file(path):
        from qwen2_triton.model.gguf_loader import load_gguf

        return Qwen2Config.from_dict(load_gguf(path, progress=False).config, source=path)
    raise ValueError(f"{path} is neither a checkpoint directory (config.json + safetensors) nor a GGUF file")


def _existing(given) -> str:
    path = os.path.expanduser(str(given))
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path does not exist: {path}" + _hub_id_hint(str(given)))
    return path


# owner/name as the Hub spells repository ids; "./x", "/x", "~/x" and "x.gguf" are meant as local paths
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def _hub_id_hint(given: str) -> str:
    """For a missing path that reads as a Hugging Face Hub id: this runtime reads local files only."""
    if not HUB_ID.fullmatch(given) or given.lower().endswith(".gguf"):
        return ""
    local = "./" + given.split("/")[1]
    return (f". If {given!r} is a Hugging Face Hub id: qwen2-triton does not download models; download it first, "
            f"e.g. `hf download {given} --local-dir {local}` (`huggingface-cli download` with huggingface_hub "
            f"< 0.34), then pass that directory: model='{local}'")


def _load_hf_dir(path: str, dtype, device, ops, progress, quantization, tp) -> LoadedModel:
    from qwen2_triton.model.tokenizer import Tokenizer

    cfg = Qwen2Config.from_file(os.path.join(path, "config.json"))
    files = safetensors_files(path)
    tokenizer = Tokenizer.from_dir(path)
    # GPTQ / AWQ: the projections arrive packed and are put in by quantized_tensors, never allocated dense first
    packed = projection_names(cfg) if read_quant_config(path) is not None else ()
    model = Qwen2Model(cfg, ops, dtype, device, tp=tp, defer=packed)
    tensors = iter_safetensors(files) if tp is None else iter_safetensors_shard(files, model.shard)
    tensors = quantized_tensors(path, model, tensors, quantization)  # GPTQ / AWQ projections
    load_into(model.params, model.local_cfg, tensors, source=path, progress=progress)
    gen = _read_generation_config(os.path.join(path, "generation_config.json"))
    eos = _eos_ids(cfg.eos_token_id, gen.pop("eos_token_id", ()), tokenizer)
    return LoadedModel(model, tokenizer, gen, eos, path)


def _load_gguf(path: str, dtype, device, ops, progress, quantization, tp) -> LoadedModel:
    from qwen2_triton.model.gguf_loader import load_gguf
    from qwen2_triton.model.gguf_quant import gguf_tensor_stream, kept_projections

    g = load_gguf(path, dtype=dtype, device="cpu", progress=False)
    cfg = Qwen2Config.from_dict(g.config, source=path)
    shard = TPShard(cfg, tp.rank, tp.world) if tp is not None else None  # the slice this rank will hold
    keep = kept_projections(g.tensors, cfg.num_hidden_layers, ops, quantization, shard, path)  # stay packed
    model = Qwen2Model(cfg, ops, dtype, device, tp=tp, defer=keep)
    tensors = gguf_tensor_stream(model, g.tensors, keep)
    if tp is not None:
        tensors = shard_tensors(tensors, model.shard, path)
    load_into(model.params, model.local_cfg, tensors, source=path, progress=progress)
    defaults = _sampling_defaults(g.generation_defaults or {})
    eos = _eos_ids(cfg.eos_token_id, (), g.tokenizer)
    return LoadedModel(model, g.tokenizer, defaults, eos, path)


def _random(spec: RandomWeights, dtype, device, ops, tp) -> LoadedModel:
    model = Qwen2Model(Qwen2Config.from_dict(spec.config, source=spec.name), ops, dtype, device, tp=tp)
    g = torch.Generator(device=device).manual_seed(spec.seed + (tp.rank if tp is not None else 0))
    for n, p in model.params.items():
        if n.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0, spec.std, generator=g)
    return LoadedModel(model, NoTextTokenizer(), {}, (), spec.name)


def _read_generation_config(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    out = _sampling_defaults(raw)
    if raw.get("eos_token_id") is not None:
        e = raw["eos_token_id"]
        out["eos_token_id"] = tuple(e) if isinstance(e, list) else (e,)
    return out


def _sampling_defaults(raw: dict) -> dict:
    """generation_config fields (HF names and conventions) -> SamplingParams defaults (ours)."""
    out = {GENERATION_KEYS[k]: raw[k] for k in GENERATION_KEYS if raw.get(k) is not None}
    if out.get("top_k") is not None and out["top_k"] <= 0:
        out["top_k"] = -1  # transformers' "off" is 0; ours is -1
    if raw.get("do_sample") is False:  # HF's greedy switch: sampling fields are then ignored
        out["temperature"] = 0.0
    return out


def _eos_ids(config_eos, gen_eos, tokenizer) -> tuple[int, ...]:
    """Stop on every end-of-sequence id: config.json's, generation_config's list, and the tokenizer's own
    (<|im_end|> and <|endoftext|> for Qwen)."""
    ids = list(config_eos) + list(gen_eos) + list(getattr(tokenizer, "eos_token_ids", ()))
    return tuple(dict.fromkeys(int(i) for i in ids))
