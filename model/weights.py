"""Weight loading: safetensors (single file or sharded) and GGUF, into the fused layout of model/qwen2.py.

Checkpoint tensors keep their HF names; ``PACKED`` maps the ones that land in a slice of a fused parameter
(q/k/v -> qkv, gate/up -> gate_up). Every tensor is read memory-mapped and copied straight into a
pre-allocated parameter of the target dtype and device, so a bf16 checkpoint never exists as a float32 copy.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator

import torch

from qwen2_triton.model.config import Qwen2Config

# checkpoint suffix -> (fused parameter suffix, shard index); shard offsets come from the config.
PACKED = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}
# Tensors some checkpoints carry that the graph derives itself.
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def safetensors_files(model_dir: str) -> list[str]:
    """The checkpoint's safetensors files: the index's shards, or the single model.safetensors."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        paths = [os.path.join(model_dir, f) for f in files]
        for p in paths:
            if not os.path.isfile(p):
                raise FileNotFoundError(f"shard listed in {index} is missing: {p}")
        return paths
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    found = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if found:
        return [os.path.join(model_dir, f) for f in found]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")


def iter_safetensors(paths: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs, each tensor memory-mapped from disk on demand."""
    from safetensors import safe_open

    for path in paths:
        size = os.path.getsize(path)
        try:
            f = safe_open(path, framework="pt", device="cpu")
            names = list(f.keys())
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise ValueError(f"{path}: not a readable safetensors file ({size} bytes): {e}") from None
        for name in names:
            try:
                yield name, f.get_tensor(name)
            except Exception as e:
                raise ValueError(f"{path}: tensor {name!r} cannot be read (truncated or corrupt file?): {e}") \
                    from None


def load_into(params: dict[str, torch.Tensor], config: Qwen2Config,
              tensors: Iterable[tuple[str, torch.Tensor]], source: str, progress: bool = False) -> None:
    """Copy checkpoint tensors into the model's (fused) parameters, casting on the copy.

    Every parameter element must be written exactly once: a missing, duplicated, extra or mis-shaped
    tensor is a ValueError naming it.
    """
    shard_sizes = {"qkv_proj": [config.q_size, config.kv_size, config.kv_size],
                   "gate_up_proj": [config.intermediate_size] * 2}
    expected = {}  # checkpoint name -> (param name, row offset or None, expected shape)
    for pname, p in params.items():
        if pname == "lm_head.weight" and config.tie_word_embeddings:
            continue
        mod, _, leaf = pname.rpartition(".")
        prefix, _, fused = mod.rpartition(".")
        if fused in shard_sizes:
            sizes = shard_sizes[fused]
            for ckpt, (target, idx) in PACKED.items():
                if target == fused:
                    off = sum(sizes[:idx])
                    expected[f"{prefix}.{ckpt}.{leaf}"] = (pname, off, (sizes[idx],) + tuple(p.shape[1:]))
        else:
            expected[pname] = (pname, None, tuple(p.shape))
    seen = set()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(expected), desc=f"loading {os.path.basename(source.rstrip('/'))}", unit="tensor")
    unexpected = []
    for name, t in tensors:
        if IGNORED.match(name) or (name == "lm_head.weight" and config.tie_word_embeddings):
            continue  # tied: a stray lm_head.weight in the checkpoint is ignored, as transformers does
        if name not in expected:
            unexpected.append(name)
            continue
        if name in seen:
            raise ValueError(f"{source}: tensor {name!r} appears twice")
        pname, off, shape = expected[name]
        if tuple(t.shape) != shape:
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, "
                             f"the config implies {shape}")
        dst = params[pname] if off is None else params[pname][off: off + shape[0]]
        dst.copy_(t)
        seen.add(name)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if unexpected:
        raise ValueError(f"{source}: unexpected tensor(s) not in a Qwen2 model: {sorted(unexpected)[:8]}"
                         + (" ..." if len(unexpected) > 8 else ""))
    missing = sorted(set(expected) - seen)
    if missing:
        raise ValueError(f"{source}: missing tensor(s): {missing[:8]}" + (" ..." if len(missing) > 8 else ""))
