"""Fused rotary + KV-cache write (kernels/rotary_store_kv.py) against the unfused references, and its place in the
graph: one launch per layer where rotary and store_kv were two."""
import pytest
import torch

from qwen2_triton.kernels.attention import store_kv_ref
from qwen2_triton.kernels.rotary import build_cos_sin_cache, concat_cos_sin, default_inv_freq, rotary_ref, \
    yarn_inv_freq
from qwen2_triton.kernels.rotary_store_kv import rotary_store_kv, rotary_store_kv_ref

NAN_FILL = 123.0


def _case(n_tokens, hq, hk, head_dim, dtype, device, seed):
    """q, k, v as views of one fused qkv buffer; rows mixing a plain and a YaRN table; slots a shuffled subset of
    a NaN cache with every third token padding (-1)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(n_tokens, (hq + 2 * hk) * head_dim, generator=g).to(dtype).to(device)
    q = qkv[:, : hq * head_dim].view(n_tokens, hq, head_dim)
    k = qkv[:, hq * head_dim: (hq + hk) * head_dim].view(n_tokens, hk, head_dim)
    v = qkv[:, (hq + hk) * head_dim:].view(n_tokens, hk, head_dim)
    plain = build_cos_sin_cache(default_inv_freq(head_dim, 1e6), 300)
    yarn = build_cos_sin_cache(yarn_inv_freq(head_dim, 1e6, 4.0, 64), 1200, 1.2)
    cos_sin, offsets = concat_cos_sin({"plain": plain, "yarn": yarn})
    pos = torch.randint(0, 300, (n_tokens,), generator=g)
    rows = torch.where(torch.arange(n_tokens) % 2 == 0, pos, pos + offsets["yarn"])
    n_blocks, block_size = 5, 16
    slots = torch.randperm(n_blocks * block_size, generator=g)[:n_tokens]
    slots[::3] = -1
    cache = torch.full((n_blocks, block_size, hk, head_dim), float("nan"), dtype=dtype, device=device)
    return qkv, q, k, v, rows.to(device), cos_sin.to(device), cache, slots.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_tokens,hq,hk,head_dim", [(13, 14, 2, 64), (5, 28, 4, 128), (1, 1, 1, 64),
                                                     (17, 20, 20, 128), (7, 12, 2, 128)])
def test_fused_matches_rotary_then_store_kv(n_tokens, hq, hk, head_dim, dtype, device):
    qkv, q, k, v, rows, cos_sin, cache, slots = _case(n_tokens, hq, hk, head_dim, dtype, device,
                                                      seed=n_tokens * 7 + hq)
    k_before, v_before = k.clone(), v.clone()
    want_q, want_k = rotary_ref(q, k, rows, cos_sin)  # the unfused pair: k rounded to its dtype, then cached
    want_kc, want_vc = cache.clone(), cache.clone()
    store_kv_ref(want_k, v, want_kc, want_vc, slots)
    kc, vc = cache.clone(), cache.clone()
    got = rotary_store_kv(q, k, v, rows, cos_sin, kc, vc, slots)
    assert got.data_ptr() == q.data_ptr()  # in place in the qkv buffer
    # float32 math and one rounding, as the references: the same bits (the kernel's x1*cos - x2*sin may fuse
    # into an FMA on a GPU; under the interpreter it is numpy's two roundings, as torch's)
    assert torch.equal(got, want_q)
    assert torch.equal(kc.nan_to_num(NAN_FILL), want_kc.nan_to_num(NAN_FILL))  # untouched slots stay NaN
    assert torch.equal(vc.nan_to_num(NAN_FILL), want_vc.nan_to_num(NAN_FILL))
    assert torch.equal(k, k_before) and torch.equal(v, v_before)  # k and v are only read


def test_reference_equals_the_unfused_pair_when_the_cache_is_narrower(device):
    """The fused op rounds rotated k once, to the cache dtype; the reference says so, and the kernel follows it."""
    qkv, q, k, v, rows, cos_sin, cache, slots = _case(9, 4, 2, 64, torch.float32, device, seed=5)
    cache = cache.to(torch.bfloat16)
    want_kc, want_vc = cache.clone(), cache.clone()
    want_q = rotary_store_kv_ref(q, k, v, rows, cos_sin, want_kc, want_vc, slots)
    kc, vc = cache.clone(), cache.clone()
    got = rotary_store_kv(q, k, v, rows, cos_sin, kc, vc, slots)
    assert torch.equal(got, want_q)
    assert torch.equal(kc.nan_to_num(NAN_FILL), want_kc.nan_to_num(NAN_FILL))
    assert torch.equal(vc.nan_to_num(NAN_FILL), want_vc.nan_to_num(NAN_FILL))


def test_bad_inputs_name_what_is_wrong(device):
    _, q, k, v, rows, cos_sin, cache, slots = _case(4, 4, 2, 64, torch.float32, device, seed=1)
    vc = cache.clone()
    with pytest.raises(ValueError, match="v shape"):
        rotary_store_kv(q, k, v[:, :1], rows, cos_sin, cache, vc, slots)
    with pytest.raises(ValueError, match="Hk, D"):
        rotary_store_kv(q, k, v, rows, cos_sin, cache[:, :, :1], vc[:, :, :1], slots)
    with pytest.raises(ValueError, match="slot_mapping dtype"):
        rotary_store_kv(q, k, v, rows, cos_sin, cache, vc, slots.int())
    with pytest.raises(ValueError, match="rows and slot_mapping must be"):
        rotary_store_kv(q, k, v, rows[:2], cos_sin, cache, vc, slots)
    with pytest.raises(ValueError, match="must equal q dtype"):
        rotary_store_kv(q, k.half(), v, rows, cos_sin, cache, vc, slots)


def test_graph_launches_the_fused_op_once_per_layer(tmp_path, qwen_tokenizer_dir, device):
    """A spy on TritonOps: each layer of a model step calls rotary_store_kv once and never rotary or store_kv,
    so the two launches stay one; the logits equal the torch ops' (whose rotary_store_kv is the reference)."""
    from qwen2_triton.model.loader import load_model
    from qwen2_triton.runtime.backend import TorchOps
    from qwen2_triton.runtime.triton_backend import TritonOps
    from tests.checkpoints import make_checkpoint

    path = str(tmp_path / "ckpt")
    make_checkpoint(path, "qwen2-1.5b", qwen_tokenizer_dir)
    calls = []

    class Spy(TritonOps):
        def rotary_store_kv(self, *a):
            calls.append("fused")
            return super().rotary_store_kv(*a)

        def rotary(self, *a):
            calls.append("rotary")
            return super().rotary(*a)

        def store_kv(self, *a):
            calls.append("store_kv")
            return super().store_kv(*a)

    logits = {}
    for name, ops in (("triton", Spy(device)), ("torch", TorchOps())):
        lm = load_model(path, torch.float32, device, ops, progress=False)
        logits[name] = _one_prefill(lm.model, device)
    n_layers = lm.model.cfg.num_hidden_layers
    assert calls == ["fused"] * n_layers
    torch.testing.assert_close(logits["triton"], logits["torch"], atol=2e-5, rtol=2e-5)


def _one_prefill(model, device):
    from qwen2_triton.kernels.attention import AttentionMetadata

    cfg = model.cfg
    T, block = 11, 16
    caches = [(torch.zeros(2, block, cfg.num_key_value_heads, cfg.head_dim, device=device),
               torch.zeros(2, block, cfg.num_key_value_heads, cfg.head_dim, device=device))
              for _ in range(cfg.num_hidden_layers)]
    meta = AttentionMetadata(cu_seqlens_q=torch.tensor([0, T], dtype=torch.int32, device=device),
                             seq_lens=torch.tensor([T], dtype=torch.int32, device=device),
                             block_tables=torch.tensor([[1, 0]], dtype=torch.int32, device=device),
                             slot_mapping=torch.arange(block, block + T, device=device),
                             max_seqlen_q=T, max_seqlen_k=T)
    ids = torch.randint(0, cfg.vocab_size, (T,), generator=torch.Generator().manual_seed(3)).to(device)
    return model.forward(ids, torch.arange(T, device=device), meta, caches, None)
