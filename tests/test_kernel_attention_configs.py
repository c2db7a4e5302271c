"""Every tile config runtime/tuning.py may pick computes the reference: whichever candidate wins on a GPU,
its numbers are these. The candidates of all archs (sm_80/86/90 lists differ by shared memory) are covered."""
import pytest
import torch

from qwen2_triton.kernels import launch
from qwen2_triton.kernels.attention import attention, attention_ref
from qwen2_triton.kernels.testing import make_paged_batch, poisoned_allocations

TOL = dict(atol=2 ** -8, rtol=2 ** -6)  # bf16, as tests/test_kernel_attention_prefill.py
ARCHS = (80, 86, 90)


def _all(fn, *args):
    seen = []
    for cap in ARCHS:
        seen += [c for c in fn(*args, cap) if c not in seen]
    return seen


def _ids(cfgs):
    return [f"{c.BLOCK_M}x{c.BLOCK_N}w{c.num_warps}s{c.num_stages}" for c in cfgs]


PREFILL = [(d, c) for d in (64, 128) for c in _all(launch.prefill_candidates, d, torch.bfloat16)]
DECODE = [(d, c) for d in (64, 128) for c in _all(launch.decode_candidates, d, torch.bfloat16, 7)]


def test_candidates_lead_with_the_heuristic_and_respect_shared_memory():
    for d in (64, 128):
        for cap in ARCHS:
            pre = launch.prefill_candidates(d, torch.bfloat16, cap)
            dec = launch.decode_candidates(d, torch.bfloat16, 7, cap)
            assert pre[0] == launch.prefill_config(d, torch.bfloat16, cap)
            assert dec[0] == launch.decode_config(d, torch.bfloat16, 7)
            assert len(set(pre)) == len(pre) > 1 and len(set(dec)) == len(dec) > 1
            for c in pre + dec:
                assert launch.attn_shared_estimate(c, d, 2, cap) <= launch.max_shared_bytes(cap)
    # sm_90: no tile leaves two warpgroups on the same rows; 99 KB parts get fewer prefill tiles than an H100
    for d in (64, 128):
        assert not any(launch.duplicates_rows(c, 90) for c in launch.prefill_candidates(d, torch.bfloat16, 90))
    assert len(launch.prefill_candidates(128, torch.bfloat16, 86)) < len(launch.prefill_candidates(128, torch.bfloat16, 90))
    assert launch.prefill_candidates(64, torch.float32, 90) == [launch.prefill_config(64, torch.float32)]


@pytest.mark.parametrize("head_dim,cfg", PREFILL, ids=[f"D{d}-{i}" for (d, _), i in zip(PREFILL, _ids(c for _, c in PREFILL))])
def test_prefill_candidate_matches_reference(head_dim, cfg, device):
    """Two sequences, one after a cached prefix, both crossing 128-row and 64-key tiles; GQA group 7."""
    g = torch.Generator().manual_seed(head_dim + cfg.BLOCK_M * 3 + cfg.BLOCK_N + cfg.num_warps + cfg.num_stages)
    q, kc, vc, meta = make_paged_batch([150, 70], [150, 200], 7, 1, head_dim, torch.bfloat16, device=device,
                                       generator=g)
    with poisoned_allocations():
        got = attention(q, kc, vc, meta, head_dim ** -0.5, prefill_cfg=cfg)
    torch.testing.assert_close(got, attention_ref(q, kc, vc, meta, head_dim ** -0.5), **TOL)


@pytest.mark.parametrize("head_dim,cfg", DECODE, ids=[f"D{d}-{i}" for (d, _), i in zip(DECODE, _ids(c for _, c in DECODE))])
def test_decode_candidate_matches_reference(head_dim, cfg, device):
    g = torch.Generator().manual_seed(head_dim + cfg.BLOCK_N + cfg.num_warps * 7 + cfg.num_stages)
    q, kc, vc, meta = make_paged_batch([1, 1, 1], [1, 90, 333], 7, 1, head_dim, torch.bfloat16, device=device,
                                       generator=g)
    with poisoned_allocations():
        got = attention(q, kc, vc, meta, head_dim ** -0.5, num_splits=3, decode_cfg=cfg, min_split_keys=32)
    torch.testing.assert_close(got, attention_ref(q, kc, vc, meta, head_dim ** -0.5), **TOL)


def test_decode_cfg_too_narrow_for_the_group_is_refused(device):
    q, kc, vc, meta = make_paged_batch([1], [5], 32, 1, 64, torch.bfloat16, device=device)
    with pytest.raises(ValueError, match="BLOCK_M=16 must be a power of two >= max\\(16, GQA group 32\\)"):
        attention(q, kc, vc, meta, 0.125, decode_cfg=launch.AttnConfig(16, 64, 4, 2))


class _Spy:
    """Stands in for a @triton.jit kernel and records the launch keywords (constexprs, warps, stages)."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_configs_reach_the_launches(monkeypatch, device):
    """The chosen tiles, warps and stages are the ones launched (not the heuristic's)."""
    from qwen2_triton.kernels import attention_decode, attention_prefill

    pre_spy = _Spy(attention_prefill.prefill_kernel)
    dec_spy = _Spy(attention_decode.decode_split_kernel)
    monkeypatch.setattr(attention_prefill, "prefill_kernel", pre_spy)
    monkeypatch.setattr(attention_decode, "decode_split_kernel", dec_spy)
    pre_cfg, dec_cfg = launch.AttnConfig(128, 32, 4, 2), launch.AttnConfig(16, 128, 8, 3)
    q, kc, vc, meta = make_paged_batch([20, 1], [20, 20], 2, 1, 64, torch.bfloat16, device=device)
    attention(q, kc, vc, meta, 0.125, prefill_cfg=pre_cfg)
    q, kc, vc, meta = make_paged_batch([1], [20], 2, 1, 64, torch.bfloat16, device=device)
    attention(q, kc, vc, meta, 0.125, decode_cfg=dec_cfg)
    # the mixed step launches the decode kernel too (for its q_len == 1 row), with its default tiles
    (p,), (d_in_prefill, d) = pre_spy.calls, dec_spy.calls
    assert d_in_prefill["BLOCK_N"] == launch.decode_config(64, torch.bfloat16, 2).BLOCK_N
    assert (p["BLOCK_M"], p["BLOCK_N"], p["num_warps"], p["num_stages"]) == (128, 32, 4, 2)
    assert (d["BLOCK_G"], d["BLOCK_N"], d["num_warps"], d["num_stages"]) == (16, 128, 8, 3)
