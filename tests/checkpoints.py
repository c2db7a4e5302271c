"""Tiny random Qwen2 checkpoints shaped after each seed model, written as the real releases are laid out.

Head counts, GQA ratios, head_dim, vocabulary rows, tying and rope_theta follow the seed; hidden size, depth
and MLP width are shrunk (head_dim is given explicitly, which Qwen2's config allows) so a CPU test stays fast.
Every weight is random and non-trivial (biases and norm weights too), so a dropped term changes the output.
"""
from __future__ import annotations

import json
import os

import torch

SEEDS = {
    # name: (heads, kv_heads, head_dim, vocab rows, tied, rope_theta)
    "qwen2-0.5b": (14, 2, 64, 151936, True, 1e6),  # GQA 7:1, head_dim 64
    "qwen2-1.5b": (12, 2, 128, 151936, True, 1e6),  # GQA 6:1
    "qwen1.5-4b": (20, 20, 128, 151936, False, 5e6),  # MHA
    "qwen2-7b": (28, 4, 128, 152064, False, 1e6),  # GQA 7:1, untied, 152064 rows
}
# Shapes that are no release's but exercise a code path the releases need at some size: one KV head puts more
# tensor-parallel ranks than KV heads on 2 processes (KV-head replication, as Qwen2-0.5B/1.5B at 4 or 8 GPUs).
EXTRA_SEEDS = {
    "gqa-1kv": (8, 1, 64, 151936, True, 1e6),  # GQA 8:1, tied
}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}


def hf_config(seed: str, yarn: bool = False, layers: int = 2, intermediate: int = 136,
              yarn_original: int = YARN["original_max_position_embeddings"]):
    """yarn_original: YaRN's original_max_position_embeddings, also max_position_embeddings as in the releases (a
    small one lets a CPU test run requests on both sides of it)."""
    from transformers import Qwen2Config

    heads, kv, head_dim, vocab, tied, theta = {**SEEDS, **EXTRA_SEEDS}[seed]
    hidden = 8 * heads  # divisible by the head count, as config validation wants, and small
    rope = {"rope_type": "default", "rope_theta": theta}
    if yarn:
        rope = {**YARN, "original_max_position_embeddings": yarn_original, "rope_theta": theta}
    return Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
        max_position_embeddings=yarn_original if yarn else 32768,
        rms_norm_eps=1e-6, tie_word_embeddings=tied, rope_parameters=rope, use_sliding_window=False,
        sliding_window=131072, bos_token_id=151643, eos_token_id=151643, architectures=["Qwen2ForCausalLM"],
    )


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial values everywhere: weights ~ N(0, 0.08), biases ~ N(0, 0.5), norm weights ~ 1 + N(0, 0.3)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))


def make_checkpoint(path: str, seed: str, tokenizer_dir: str, yarn: bool = False, legacy_layout: bool = False,
                    rng_seed: int = 0, shards: bool = False,
                    yarn_original: int = YARN["original_max_position_embeddings"]):
    """Write a tiny checkpoint to ``path`` and return the HF model (float32, eval) that is its oracle."""
    from transformers import Qwen2ForCausalLM

    cfg = hf_config(seed, yarn=yarn, yarn_original=yarn_original)
    model = Qwen2ForCausalLM(cfg).eval()
    randomize(model, rng_seed)
    model.save_pretrained(path, max_shard_size="2MB" if shards else "5GB")
    if legacy_layout:
        to_legacy_layout(os.path.join(path, "config.json"))
    for name in os.listdir(tokenizer_dir):
        with open(os.path.join(tokenizer_dir, name), "rb") as src, open(os.path.join(path, name), "wb") as dst:
            dst.write(src.read())
    return model


def to_legacy_layout(config_path: str) -> None:
    """Rewrite config.json as the 2024 releases were: top-level rope_theta, rope_scaling spelled with "type"."""
    with open(config_path) as f:
        raw = json.load(f)
    rope = raw.pop("rope_parameters", None) or {}
    raw["rope_theta"] = rope.get("rope_theta", 10000.0)
    if rope.get("rope_type", "default") != "default":
        raw["rope_scaling"] = {"type": rope["rope_type"], **{k: v for k, v in rope.items()
                                                            if k not in ("rope_type", "rope_theta")}}
    else:
        raw["rope_scaling"] = None
    with open(config_path, "w") as f:
        json.dump(raw, f, indent=2)


def hf_prompt_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1, float64 from HF's float32 logits."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    lp = logits.log_softmax(-1)
    return lp[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


def checkpoint_fixture(seed: str = "qwen2-0.5b", **kw):
    """A module-scoped pytest fixture named ``ckpt``: the path of a tiny checkpoint shaped after ``seed`` with the
    Qwen tokenizer (make_checkpoint's keywords pass through). At a test module's top: ``ckpt = checkpoint_fixture()``."""
    import pytest

    @pytest.fixture(scope="module")
    def ckpt(module_tmp, qwen_tokenizer_dir):
        path = module_tmp(f"{seed}_ckpt")
        make_checkpoint(path, seed, qwen_tokenizer_dir, **kw)
        return path

    return ckpt
