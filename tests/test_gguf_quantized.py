"""GGUF projections kept quantized (model/gguf_quant.py + kernels/gguf_linear.py) at model level: a tiny 2-layer
Qwen2 GGUF whose seven projections per layer are real Q4_K, Q6_K, Q8_0 and Q5_0 blocks sliced from the demo model
(K = 256 / 512: whole K-quant super-blocks), loaded with the Triton ops (interpreter on CPU), must keep them as
GGUF weights and give the prompt log-probs of the dequantize-at-load path (the torch ops)."""
from __future__ import annotations

import logging

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from qwen2_triton import LLM, SamplingParams
from qwen2_triton.kernels.gguf_linear import FusedGGUFWeight, GGUFWeight
from qwen2_triton.model.gguf_blocks import BLOCK_BYTES

HIDDEN, HEADS, KV_HEADS, INTER, LAYERS = 256, 4, 2, 512, 2
HEAD_DIM = HIDDEN // HEADS
TOKENS = [chr(c) for c in range(33, 127)] + ["he", "ll", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB = len(TOKENS)
PROJ = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN), "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN),
        "attn_output": (HIDDEN, HIDDEN), "ffn_gate": (INTER, HIDDEN), "ffn_up": (INTER, HIDDEN),
        "ffn_down": (HIDDEN, INTER)}
# Every type in fused and single projections, and fused projections mixing types (Q4_K_M files do: the demo's
# attn_v is Q8_0 in half its layers next to Q5_0 q/k; its ffn_down Q4_K or Q6_K).
TYPES = [{"attn_q": "Q5_0", "attn_k": "Q5_0", "attn_v": "Q8_0", "attn_output": "Q4_K", "ffn_gate": "Q6_K",
          "ffn_up": "Q4_K", "ffn_down": "Q6_K"},
         {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q8_0", "ffn_gate": "Q5_0",
          "ffn_up": "Q5_0", "ffn_down": "Q4_K"}]
IDS = [int(i) for i in np.random.default_rng(1).integers(0, VOCAB - 3, 40)]
# Both paths run float32 on bit-identical weights (tests/test_kernel_gguf_linear.py), so they differ only in the
# order of fp32 sums (the projections, and the Triton attention / norms the dense Triton path has too). Measured
# on these log-probs (mean -8.6, std 3.5; an fp32 ulp is 1-2e-6 there): 4.8e-6 quantized Triton vs torch, the same
# 4.8e-6 for dense Triton (quantization="none") vs torch, 3.8e-6 quantized vs dense Triton. 2e-5 is 4x that; a
# wrong Q4_K min moves them by > 1e-2 (test below).
TOL = 2e-5


@pytest.fixture(scope="module")
def demo_blocks(demo_gguf):
    """type -> all blocks (n, block bytes) of the first demo tensor of that type."""
    from qwen2_triton.model.gguf_file import read_gguf

    out = {}
    for t in read_gguf(demo_gguf).tensors:
        q = t.tensor_type.name
        if q in BLOCK_BYTES and t.name.startswith("blk.") and q not in out:
            out[q] = np.asarray(t.data).reshape(-1, BLOCK_BYTES[q][0])
    return out


def write_gguf(path, demo_blocks, types=TYPES, extra=None, head=None, tied=False, embd=None) -> str:
    """The tiny model; ``extra``: gguf name -> (float32 values, QT) written quantized by gguf.quants instead;
    ``head``: a type (QT) the lm_head is quantized to by gguf.quants (default float32): output.weight's, or with
    ``tied`` token_embd's, output.weight left out (the lm_head is then the embedding, as in tied releases);
    ``embd``: the type of an untied token_embd (default float32)."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "qwen2")
    for key, value in (("block_count", LAYERS), ("context_length", 4096), ("embedding_length", HIDDEN),
                       ("feed_forward_length", INTER), ("attention.head_count", HEADS),
                       ("attention.head_count_kv", KV_HEADS)):
        w.add_uint32(f"qwen2.{key}", value)
    w.add_float32("qwen2.rope.freq_base", 1e6)
    w.add_float32("qwen2.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(TOKENS)
    w.add_token_types([1] * (VOCAB - 3) + [3, 3, 3])
    w.add_token_merges(["h e", "l l"])
    w.add_eos_token_id(VOCAB - 1)

    def f32(name, shape, std, mean=0.0):
        w.add_tensor(name, (mean + std * rng.standard_normal(shape)).astype(np.float32))

    def table(name, std, qtype):
        x = (std * rng.standard_normal((VOCAB, HIDDEN))).astype(np.float32)
        if qtype is None:
            w.add_tensor(name, x)
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)

    if tied:  # one table for both ends: 0.05 keeps the log-probs near the untied model's size (mean -11, std 1)
        table("token_embd.weight", 0.05, head)
    else:
        table("token_embd.weight", 0.02, embd)
    f32("output_norm.weight", (HIDDEN,), 0.1, 1.0)
    if not tied:
        table("output.weight", 0.2, head)
    start = dict.fromkeys(BLOCK_BYTES, 0)
    for n in range(LAYERS):
        for proj, (rows, cols) in PROJ.items():
            name = f"blk.{n}.{proj}.weight"
            if extra and name in extra:
                x, qtype = extra[name]
                w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
                continue
            qtype = types[n][proj]
            count = rows * cols // BLOCK_BYTES[qtype][1]
            blocks = demo_blocks[qtype][start[qtype]: start[qtype] + count]  # real blocks, a new run per tensor
            assert len(blocks) == count
            start[qtype] += count
            w.add_tensor(name, np.ascontiguousarray(blocks).reshape(rows, -1), raw_dtype=QT[qtype])
        for proj in ("attn_q", "attn_k", "attn_v"):
            f32(f"blk.{n}.{proj}.bias", (PROJ[proj][0],), 0.1)
        f32(f"blk.{n}.attn_norm.weight", (HIDDEN,), 0.1, 1.0)
        f32(f"blk.{n}.ffn_norm.weight", (HIDDEN,), 0.1, 1.0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, demo_blocks):
    return write_gguf(tmp_path_factory.mktemp("gguf_q") / "tiny.gguf", demo_blocks)


def llm(path, kernels, **kw):
    return LLM(path, dtype="float32", device="cpu", kernels=kernels, progress=False, **kw)


def prompt_logprobs(model: LLM, max_tokens: int = 1):
    out = model.generate(IDS, SamplingParams(max_tokens=max_tokens, temperature=0, prompt_logprobs=0,
                                             ignore_eos=True))[0]
    lp = torch.tensor([d[t] for d, t in zip(out.prompt_logprobs[1:], IDS[1:])], dtype=torch.float64)
    return lp, out.token_ids


@pytest.fixture(scope="module")
def torch_ref(tiny):
    lp, tokens = prompt_logprobs(llm(tiny, "torch"), max_tokens=3)
    assert lp.std() > 0.3  # far from uniform, so a mis-read block would show
    return lp, tokens


def _kinds(model):
    P = model.model.params
    return {name.split(".", 2)[2].rsplit(".", 1)[0]: P[name] for name in P
            if name.endswith("proj.weight")}


def test_projections_stay_quantized_and_match_dequantized(tiny, torch_ref):
    """Prefill (a 40-token prompt) through the tiled launch, then split-K decode steps; tokens equal the torch
    path's."""
    tri = llm(tiny, "triton")
    kinds = _kinds(tri)
    assert len(kinds) == 4 * LAYERS and not any(isinstance(w, torch.Tensor) for w in kinds.values())
    qkv0, gu0, qkv1, gu1 = (kinds[k] for k in ("0.self_attn.qkv_proj", "0.mlp.gate_up_proj",
                                                "1.self_attn.qkv_proj", "1.mlp.gate_up_proj"))
    assert isinstance(qkv0, FusedGGUFWeight) and [(p.qtype, p.out_features) for p in qkv0.parts] == \
        [("Q5_0", HIDDEN + KV_HEADS * HEAD_DIM), ("Q8_0", KV_HEADS * HEAD_DIM)]
    assert [p.qtype for p in gu0.parts] == ["Q6_K", "Q4_K"] and [p.qtype for p in qkv1.parts] == ["Q4_K", "Q6_K"]
    assert isinstance(gu1, GGUFWeight) and (gu1.qtype, gu1.out_features) == ("Q5_0", 2 * INTER)
    assert kinds["0.mlp.down_proj"].qtype == "Q6_K" and kinds["1.self_attn.o_proj"].qtype == "Q8_0"
    P = tri.model.params
    assert isinstance(P["model.embed_tokens.weight"], torch.Tensor) and isinstance(P["lm_head.weight"], torch.Tensor)
    lp, tokens = prompt_logprobs(tri, max_tokens=3)
    torch.testing.assert_close(lp, torch_ref[0], atol=TOL, rtol=0)
    assert tokens == torch_ref[1]



@pytest.mark.parametrize("head,tied,embd", [(QT.Q8_0, False, QT.Q4_0), (QT.Q8_0, False, None), (QT.Q5_0, True, None)],
                         ids=["output-Q8_0-embd-Q4_0", "output-Q8_0-embd-F32", "tied-embd-Q5_0"])
def test_lm_head_and_embedding_stay_quantized(tmp_path, demo_blocks, head, tied, embd):
    """The lm_head, the largest weight a decode step reads, runs from its blocks as the demo's Q8_0 output.weight
    does, and the embedding table is looked up from its blocks (a float32 one loads dense); tied (no output.weight),
    the one Q5_0 table is both. Prompt log-probs and tokens equal the torch path's, which dequantizes them."""
    path = write_gguf(tmp_path / "head.gguf", demo_blocks, head=head, tied=tied, embd=embd)
    tri = llm(path, "triton")
    P = tri.model.params
    emb, lm = P["model.embed_tokens.weight"], tri.model.lm_head
    assert isinstance(lm, GGUFWeight) and (lm.qtype, lm.out_features, lm.in_features) == (head.name, VOCAB, HIDDEN)
    assert (lm is emb) == tied and ("lm_head.weight" in P) != tied
    assert isinstance(emb, GGUFWeight if (tied or embd is not None) else torch.Tensor)
    from qwen2_triton.bench.e2e import weight_bytes  # a decode step reads the lm_head, one row of the table per token
    from qwen2_triton.runtime.quant_tuning import quant_shapes  # a table only looked up is not tuned as a linear

    assert any(w is emb for w in quant_shapes(P).values()) == tied

    assert weight_bytes(tri) == sum(p.nbytes for p in P.values()) - (0 if tied else emb.nbytes)
    ref_llm = llm(path, "torch")
    assert ("lm_head.weight" in ref_llm.model.params) != tied
    ref, ref_tokens = prompt_logprobs(ref_llm, max_tokens=3)
    lp, tokens = prompt_logprobs(tri, max_tokens=3)
    assert ref.std() > 0.3, ref
    torch.testing.assert_close(lp, ref, atol=TOL, rtol=0)
    assert tokens == ref_tokens

def test_q5_k_m_and_legacy_types_stay_quantized(tmp_path, demo_blocks):
    """The types of Q5_K_M / Q5_K_S files and the legacy ones (llama.cpp's fallbacks for rows that are not whole
    super-blocks, Qwen2-0.5B's 896), which the demo (Q4_K_M) does not use: layer 0's projections as Q5_K (random
    blocks with sane d, dmin) and Q5_1, Q4_1, Q4_0 (blocks gguf.quants wrote), fused with each other and with the
    demo's types in layer 1. They load as GGUF weights and give the torch path's log-probs and tokens."""
    from gguf.quants import quantize
    from test_kernel_gguf_linear import random_blocks

    rng = np.random.default_rng(7)
    # d, dmin of 1e-5..4e-5 put the typical |weight| (d * sc * q - dmin * m, sc, m < 64, q < 32) near the demo's
    # real ones (~0.02), so the model's activations, and the fp32 rounding TOL allows for, are of the same size
    blocks = {**demo_blocks, "Q5_K": random_blocks("Q5_K", 8, 256 * 160, seed=3, d_range=(1e-5, 4e-5)).reshape(-1, 176),
              **{q: quantize((0.05 * rng.standard_normal((64, 4096))).astype(np.float32), QT[q]).reshape(
                  -1, BLOCK_BYTES[q][0]) for q in ("Q4_0", "Q5_1", "Q4_1")}}
    types = [{"attn_q": "Q5_K", "attn_k": "Q5_K", "attn_v": "Q5_1", "attn_output": "Q4_1", "ffn_gate": "Q4_0",
              "ffn_up": "Q5_K", "ffn_down": "Q4_0"}, TYPES[1]]
    path = write_gguf(tmp_path / "q5km.gguf", blocks, types=types)
    tri = llm(path, "triton")
    kinds = _kinds(tri)
    assert not any(isinstance(w, torch.Tensor) for w in kinds.values())
    qkv, gu = kinds["0.self_attn.qkv_proj"], kinds["0.mlp.gate_up_proj"]
    assert [p.qtype for p in qkv.parts] == ["Q5_K", "Q5_1"] and [p.qtype for p in gu.parts] == ["Q4_0", "Q5_K"]
    assert (kinds["0.self_attn.o_proj"].qtype, kinds["0.mlp.down_proj"].qtype) == ("Q4_1", "Q4_0")
    ref, ref_tokens = prompt_logprobs(llm(path, "torch"), max_tokens=3)
    lp, tokens = prompt_logprobs(tri, max_tokens=3)
    assert ref.std() > 0.3
    torch.testing.assert_close(lp, ref, atol=TOL, rtol=0)
    assert tokens == ref_tokens

def test_quantization_none_and_torch_ops_dequantize(tiny, torch_ref):
    dense = llm(tiny, "triton", quantization="none")
    assert all(isinstance(p, torch.Tensor) for p in dense.model.params.values())
    torch.testing.assert_close(prompt_logprobs(dense)[0], torch_ref[0], atol=TOL, rtol=0)
    assert all(isinstance(p, torch.Tensor) for p in llm(tiny, "torch").model.params.values())


def test_a_type_the_kernel_does_not_read_dequantizes_its_projection(tmp_path, demo_blocks, caplog):
    """Layer 1's ffn_up as F16 (files keep some tensors unquantized): the fused gate_up of layer 1 loads dense
    (logged), every other projection stays quantized, and the model still equals the torch path."""
    x = np.random.default_rng(3).standard_normal(PROJ["ffn_up"]).astype(np.float32) * 0.05
    path = write_gguf(tmp_path / "f16.gguf", demo_blocks, extra={"blk.1.ffn_up.weight": (x, QT.F16)})
    with caplog.at_level(logging.INFO, logger="qwen2_triton.model.gguf_quant"):
        tri = llm(path, "triton")
    assert "model.layers.1.mlp.gate_up_proj (Q5_0+F16)" in caplog.text
    kinds = _kinds(tri)
    assert isinstance(kinds["1.mlp.gate_up_proj"], torch.Tensor)
    assert sum(isinstance(w, torch.Tensor) for w in kinds.values()) == 1
    ref = prompt_logprobs(llm(path, "torch"))[0]
    torch.testing.assert_close(prompt_logprobs(tri)[0], ref, atol=TOL, rtol=0)


def test_a_wrong_q4_k_min_is_caught(tiny, torch_ref, monkeypatch):
    """The comparison can fail: Q4_K's mins read from the scales' byte (sc for m) at load moves log-probs by far
    more than TOL."""
    from qwen2_triton.model import gguf_blocks

    real = gguf_blocks.q4_k_scale_min
    monkeypatch.setattr(gguf_blocks, "q4_k_scale_min", lambda s: (real(s)[0], real(s)[0]))
    lp = prompt_logprobs(llm(tiny, "triton"))[0]
    assert (lp - torch_ref[0]).abs().max() > 1e-2


def test_env_names_the_gguf_types_and_bytes(tiny):
    from qwen2_triton.model.quantization import describe_quantization

    line = describe_quantization(tiny)
    assert line.startswith("quantization: GGUF")
    assert "14 tensors (Q4_K x5, Q5_0 x4, Q6_K x3, Q8_0 x2; no embedding or lm_head among them) run from their " \
           "blocks by the GGUF kernels" in line
    assert "2 of other types dequantized at load: embed_tokens (F32), lm_head (F32)" in line


def test_kept_projections_are_never_allocated_dense(tiny, monkeypatch):
    """The loader builds the model without the projections that stay quantized (model/gguf_quant.py
    ``kept_projections``), so no dense copy of them is allocated during the load; the dequantized ones are."""
    from qwen2_triton.model import loader

    allocated = []

    class Recording(loader.Qwen2Model):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            allocated.append(set(self.params))

    monkeypatch.setattr(loader, "Qwen2Model", Recording)
    for kernels, quantization in (("triton", "auto"), ("triton", "none"), ("torch", "auto")):
        model = llm(tiny, kernels, quantization=quantization).model
        names = allocated.pop()
        projections = {n for n in model.params if n.endswith("_proj.weight")}
        kept = {n for n in projections if not isinstance(model.params[n], torch.Tensor)}
        assert len(projections) == 4 * LAYERS and kept == (projections if quantization == "auto" and
                                                           kernels == "triton" else set())
        assert not kept & names and (projections - kept) <= names
