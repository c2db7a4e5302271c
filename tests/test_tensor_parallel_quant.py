"""Tensor parallelism over quantized checkpoints. GPTQ / AWQ (model/quant_shard.py): each rank's slice of a
projection against the same slice of the whole weight, bit for bit, and the sharded engine (2 gloo processes on the
CPU) against the independent reader's prompt log-probs (tests/data/quant/refs.json, as tests/test_quantized.py).
GGUF (model/gguf_quant.py): each rank packs its slice of the blocks; the sharded engine against the torch path."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist

from qwen2_triton import LLM
from qwen2_triton.kernels.quant_linear import FusedQuantWeight, QuantWeight, dequantize, pack_quant_weight
from qwen2_triton.model.config import Qwen2Config
from qwen2_triton.model.quant_common import IntLinear
from qwen2_triton.model.quant_shard import shard_int_linear
from qwen2_triton.model.sharding import TPShard
import test_gguf_quantized as gq
import test_quantized as tq
from test_quantized import DATA, TOL, prompt_logprobs, reference

checkpoint, demo_blocks, tiny, torch_ref = tq.checkpoint, gq.demo_blocks, gq.tiny, gq.torch_ref  # their fixtures

# hidden 384, 12 heads of 128 (q 1536), 2 KV heads, intermediate 256, group 128
CFG = Qwen2Config.from_file(os.path.join(DATA, "gptq-int4-g128-descact", "config.json"))
GROUP = 128


def random_int_linear(k: int, n: int, act_order: bool, seed: int) -> IntLinear:
    g = torch.Generator().manual_seed(seed)
    groups = k // GROUP
    g_idx = torch.arange(k) // GROUP
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    return IntLinear(torch.randint(0, 16, (k, n), generator=g).to(torch.uint8),
                     torch.randint(0, 16, (groups, n), generator=g).to(torch.int16),
                     (torch.rand(groups, n, generator=g) * 0.02 + 0.001).to(torch.float16), g_idx, 4, GROUP)


# (checkpoint projection, in_features K, out_features N); the kind of split is model/sharding.py's
PROJECTIONS = {"self_attn.q_proj": (384, 1536), "self_attn.k_proj": (384, 256), "self_attn.o_proj": (1536, 384),
               "mlp.gate_proj": (384, 256), "mlp.down_proj": (256, 384)}


@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act-order"])
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("proj", PROJECTIONS)
def test_a_rank_holds_its_slice_of_the_whole_weight(proj, world, act_order):
    """Column splits (q, k with KV-head replication at 4 ranks, gate) and row splits (o, down) dequantize to the
    rank's slice of the whole weight exactly. The kernel's packer takes every column split and every row split
    whose groups, renumbered, are in natural order (one starting at a group boundary, or lying inside one group:
    down_proj's 64 rows at 4 ranks), and gives the same values; an act-order row split is refused, never packed
    wrong."""
    k, n = PROJECTIONS[proj]
    full = random_int_linear(k, n, act_order, seed=world)
    dense = full.dequantize(torch.float32)  # (N, K)
    name = f"model.layers.0.{proj}"
    for rank in range(world):
        shard = TPShard(CFG, rank, world)
        dim, start, stop, _ = shard.split_of(name + ".weight")
        want = dense[start:stop] if dim == 0 else dense[:, start:stop]
        part = shard_int_linear(full, shard, name, "test")
        assert torch.equal(part.dequantize(torch.float32), want), (rank, dim)
        natural = dim == 0 or (not act_order and (start % GROUP == 0 or start // GROUP == (stop - 1) // GROUP))
        if natural:
            packed = pack_quant_weight(part.codes, part.zeros, part.scales, part.g_idx, part.bits, part.group_size)
            assert (packed.out_features, packed.in_features) == tuple(want.shape)
            assert torch.equal(dequantize(packed), want), rank
        else:
            with pytest.raises(ValueError, match="contiguous groups"):
                pack_quant_weight(part.codes, part.zeros, part.scales, part.g_idx, part.bits, part.group_size)


def test_a_slice_of_the_wrong_width_is_named():
    shard = TPShard(CFG, 0, 2)
    with pytest.raises(ValueError, match="o_proj has 1024 input features, the config implies 1536"):
        shard_int_linear(random_int_linear(1024, 384, False, 0), shard, "model.layers.3.self_attn.o_proj", "ckpt")


ENGINE = dict(dtype="float32", device="cpu", progress=False, tensor_parallel_size=2)


@pytest.mark.parametrize("name", ["gptq-int4-g128-sym", "awq-int4-g128", "gptq-int4-g128-descact"])
def test_two_ranks_match_the_independent_reader(checkpoint, name):
    """The torch path: each rank dequantizes its slices at load."""
    with LLM(checkpoint(name), kernels="torch", **ENGINE) as llm:
        assert llm.model.local_cfg.num_attention_heads * 2 == json.load(
            open(os.path.join(DATA, name, "config.json")))["num_attention_heads"]
        ours, _ = prompt_logprobs(llm)
    torch.testing.assert_close(ours, reference(name), atol=TOL, rtol=0)
    assert not dist.is_initialized()


def test_two_ranks_run_their_slices_through_the_kernel(checkpoint, capfd):
    """The Triton path (interpreter) on Qwen2-0.5B's head layout: qkv, gate_up and down_proj (128 rows, one whole
    group) stay packed on both ranks, and so does rank 0's o_proj (rows 0-447: groups 0-3, the last one cut short
    at the end); rank 1's o_proj (rows 448-895) starts inside group 3, so it runs dequantized and its load says so
    (the worker's log reaches this process's stderr). Log-probs still match the independent reader."""
    name = "gptq-int4-g128-sym"
    with LLM(checkpoint(name), kernels="triton", **ENGINE) as llm:
        P = llm.model.params
        for fused in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            assert isinstance(P[f"model.layers.1.{fused}.weight"], (QuantWeight, FusedQuantWeight)), fused
        assert P["model.layers.1.self_attn.o_proj.weight"].in_features == 448
        ours, _ = prompt_logprobs(llm)
    torch.testing.assert_close(ours, reference(name), atol=TOL, rtol=0)
    err = capfd.readouterr().err
    assert "(tensor-parallel rank 1 of 2): 2 projection(s) run dequantized" in err, err
    assert "model.layers.1.self_attn.o_proj: g_idx does not sort into contiguous groups of 128 rows" in err, err


class _Split:
    """A stand-in rank whose every tensor has the split ``(dim, start, stop, full)`` (model/sharding.py)."""
    def __init__(self, *split):
        self.split = split

    def split_of(self, name):
        return self.split


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q5_1"])
def test_a_rank_packs_its_slice_of_the_blocks(qtype, device):
    """model/gguf_quant.py ``rank_fields``: row slices of a K-quant that start and end inside 256-value super-blocks
    (as Qwen2-0.5B's down_proj at 2 ranks: 2432 columns), at its first and last columns, and column slices, give
    exactly the same slice of the whole weight gguf.quants decodes, and the kernel computes with it."""
    from qwen2_triton.kernels.gguf_linear import dequantize as gguf_dequantize
    from qwen2_triton.kernels.gguf_linear import gguf_linear, pack_gguf_weight
    from qwen2_triton.model.gguf_quant import rank_fields
    from test_kernel_gguf_linear import random_blocks, weight

    k = 1024 if qtype[-1] == "K" else 256
    raw = random_blocks(qtype, 24, k, seed=9)
    _, dense = weight(raw, qtype)
    for split in ((1, 96, 608), (1, 0, 160), (1, 864, 1024), (1, 512, 768), (0, 5, 19)) if k == 1024 else \
            ((1, 64, 160), (0, 5, 19)):
        dim, start, stop = split
        fields, k_offset = rank_fields(raw, qtype, _Split(*split, (24, k)[dim]), "x")
        w = pack_gguf_weight(**fields.__dict__, k_offset=k_offset)
        want = dense[start:stop] if dim == 0 else dense[:, start:stop]
        assert torch.equal(gguf_dequantize(w), want), split
        assert w.k_offset == (start % 256 if dim == 1 and qtype[-1] == "K" else 0)
        x = torch.randn(3, want.shape[1], generator=torch.Generator().manual_seed(stop))
        torch.testing.assert_close(gguf_linear(x.to(device), w.to(device)).cpu(), x @ want.t(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_keep_their_gguf_blocks(tiny, torch_ref, world):
    """tests/test_gguf_quantized.py's tiny GGUF (real demo blocks) on 2 and 4 ranks with the Triton kernels: every
    projection keeps its blocks: q/k/v and gate/up their rows (at 4 ranks, one q head and the replicated KV head
    each), o_proj and down_proj their input columns, inside K-quant super-blocks where the split falls there (layer
    0's Q4_K o_proj: 128 or 64 of a block's 256 columns a rank; its Q6_K down_proj at 4 ranks: 128); the embedding
    and lm_head are vocab-parallel and dense. Prompt log-probs and tokens equal the single-process torch path's."""
    from qwen2_triton.kernels.gguf_linear import FusedGGUFWeight

    with LLM(tiny, dtype="float32", device="cpu", kernels="triton", progress=False,
             tensor_parallel_size=world) as llm:  # rank 0's params
        P = llm.model.params
        kinds = {n.split(".", 2)[2].rsplit(".", 1)[0]: P[n] for n in P if n.endswith("proj.weight")}
        assert not any(isinstance(w, torch.Tensor) for w in kinds.values()), kinds
        assert all(isinstance(P[n], torch.Tensor) for n in ("lm_head.weight", "model.embed_tokens.weight"))
        o, down = kinds["0.self_attn.o_proj"], kinds["0.mlp.down_proj"]
        assert (o.qtype, o.in_features, down.in_features) == ("Q4_K", gq.HIDDEN // world, gq.INTER // world)
        kv = max(1, gq.KV_HEADS // world) * gq.HEAD_DIM
        qkv = kinds["0.self_attn.qkv_proj"]  # this rank's q and k heads (Q5_0), v (Q8_0)
        assert isinstance(qkv, FusedGGUFWeight) and [p.out_features for p in qkv.parts] == \
            [gq.HEADS // world * gq.HEAD_DIM + kv, kv]
        lp, tokens = gq.prompt_logprobs(llm, max_tokens=3)
    torch.testing.assert_close(lp, torch_ref[0], atol=gq.TOL, rtol=0)
    assert tokens == torch_ref[1]
