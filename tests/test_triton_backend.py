"""TritonOps (runtime/triton_backend.py) is wired to the kernels and matches TorchOps on one small layer step."""
import torch

from qwen2_triton.kernels.rotary import build_cos_sin_cache, default_inv_freq
from qwen2_triton.kernels.testing import make_paged_batch
from qwen2_triton.runtime.backend import TorchOps, select_ops
from qwen2_triton.runtime.triton_backend import TritonOps


def test_select_ops_gives_triton_ops(device):
    ops = select_ops("triton", device)
    assert isinstance(ops, TritonOps) and ops.name == "triton"


def test_triton_ops_match_torch_ops(device):
    ops, ref = TritonOps(device), TorchOps()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=g).to(device)
    r = torch.randn(5, 64, generator=g).to(device)
    w = torch.randn(64, generator=g).to(device)
    for got, want in zip(ops.rms_norm(x, w, 1e-6, r), ref.rms_norm(x, w, 1e-6, r)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    gate_up = torch.randn(5, 26, generator=g).to(device)
    torch.testing.assert_close(ops.swiglu(gate_up), ref.swiglu(gate_up), atol=1e-5, rtol=1e-5)

    cos_sin = build_cos_sin_cache(default_inv_freq(64, 1e6), 64).to(device)
    q, k = torch.randn(5, 2, 64, generator=g).to(device), torch.randn(5, 1, 64, generator=g).to(device)
    pos = torch.arange(5, device=device)
    for got, want in zip(ops.rotary(q.clone(), k.clone(), pos, cos_sin), ref.rotary(q, k, pos, cos_sin)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    q, k_cache, v_cache, meta = make_paged_batch([3, 1], [3, 20], 2, 1, 64, torch.float32, device=device,
                                                 generator=g)
    k_new, v_new = torch.randn(4, 1, 64, generator=g).to(device), torch.randn(4, 1, 64, generator=g).to(device)
    slots = torch.tensor([0, 1, -1, 5], device=device)
    kc, vc = k_cache.clone(), v_cache.clone()
    ops.store_kv(k_new, v_new, kc, vc, slots)
    ref.store_kv(k_new, v_new, k_cache, v_cache, slots)
    assert torch.equal(kc.nan_to_num(7.0), k_cache.nan_to_num(7.0))
    torch.testing.assert_close(ops.attention(q, kc, vc, meta, 0.125), ref.attention(q, kc, vc, meta, 0.125),
                               atol=1e-5, rtol=1e-5)
    decode = make_paged_batch([1, 1], [7, 300], 2, 1, 64, torch.float32, device=device, generator=g)
    torch.testing.assert_close(ops.attention(*decode, 0.125), ref.attention(*decode, 0.125), atol=1e-5, rtol=1e-5)
