"""Mixed steps (decode rows beside prefill chunks) against attention_ref, and which kernel runs which rows.

A mixed step launches the prefill kernel and the split-KV decode kernel over disjoint rows: q_len == 1
sequences (decodes, 1-token chunks) go to the decode kernel, the rest to the prefill kernel, whose grid is
compact over query blocks (kernels/attention_prefill.py), not cdiv(max_q, BLOCK_M) x B.
"""
import pytest
import torch

from qwen2_triton.kernels import attention_decode as decode_mod
from qwen2_triton.kernels import attention_prefill as prefill_mod
from qwen2_triton.kernels.attention import attention, attention_ref
from qwen2_triton.kernels.launch import AttnConfig
from qwen2_triton.kernels.testing import make_paged_batch, poisoned_allocations

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2 ** -8, rtol=2 ** -6)}


def _batch(q_lens, seq_lens, hq, hk, d, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return make_paged_batch(q_lens, seq_lens, hq, hk, d, dtype, device=device, generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hk", [(7, 1), (4, 2)])
def test_mixed_step_short_contexts(hq, hk, dtype, device):
    """Decodes at 1, 9 and 40 keys beside a plain prefill (23), a chunk after a cached prefix (5 at 130), an
    unscheduled sequence and a 1-token chunk (which also takes the decode kernel)."""
    q, kc, vc, meta = _batch([1, 23, 1, 5, 0, 1, 1], [40, 23, 1, 130, 9, 17, 9], hq, hk, 64, dtype, device, seed=hq)
    with poisoned_allocations():
        got = attention(q, kc, vc, meta, 0.125, num_splits=3, min_split_keys=16)
    torch.testing.assert_close(got, attention_ref(q, kc, vc, meta, 0.125), **TOL[dtype])


def test_mixed_step_long_context_decode(device):
    """A decode row at 1100 keys (split 4 ways) beside a 70-token chunk and a short decode, head_dim 128."""
    q, kc, vc, meta = _batch([1, 70, 1], [1100, 90, 3], 7, 1, 128, torch.bfloat16, device, seed=7)
    with poisoned_allocations():
        got = attention(q, kc, vc, meta, 128 ** -0.5, num_splits=4)
    torch.testing.assert_close(got, attention_ref(q, kc, vc, meta, 128 ** -0.5), **TOL[torch.bfloat16])


class _Spy:
    """Stands in for a @triton.jit kernel: records each launch grid, and launches only when ``run``."""

    def __init__(self, kernel, run=True):
        self.kernel, self.run, self.grids = kernel, run, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid] if self.run else (lambda *a, **k: None)


def _rows(meta):
    cu = meta.cu_seqlens_q.tolist()
    decode = [r for b in range(len(cu) - 1) if cu[b + 1] - cu[b] == 1 for r in range(cu[b], cu[b + 1])]
    return decode, [r for r in range(cu[-1]) if r not in decode]


@pytest.mark.parametrize("silenced", ["prefill", "decode"])
def test_decode_rows_never_run_in_prefill_tiles(monkeypatch, silenced, device):
    """With one kernel silenced, the rows it owns stay unwritten (NaN from the poisoned output) and the other
    kernel's rows are still right: the prefill kernel writes no decode row, the decode kernel no chunk row."""
    spies = {"prefill": _Spy(prefill_mod.prefill_kernel, run=silenced != "prefill"),
             "decode": _Spy(decode_mod.decode_split_kernel, run=silenced != "decode")}
    monkeypatch.setattr(prefill_mod, "prefill_kernel", spies["prefill"])
    monkeypatch.setattr(decode_mod, "decode_split_kernel", spies["decode"])
    q, kc, vc, meta = _batch([1, 40, 1, 1, 3], [300, 40, 7, 64, 50], 7, 1, 64, torch.bfloat16, device, seed=2)
    with poisoned_allocations():
        got = attention(q, kc, vc, meta, 0.125, num_splits=1)
    want = attention_ref(q, kc, vc, meta, 0.125)
    decode_rows, prefill_rows = _rows(meta)
    silent, live = (prefill_rows, decode_rows) if silenced == "prefill" else (decode_rows, prefill_rows)
    assert got[silent].isnan().all()
    torch.testing.assert_close(got[live], want[live], **TOL[torch.bfloat16])
    assert len(spies["prefill"].grids) == len(spies["decode"].grids) == 1


def test_prefill_grid_is_compact(monkeypatch, device):
    """63 decodes + one 130-token chunk: the prefill grid is Hq x (T // BLOCK_M + B) programs, against
    Hq x cdiv(max_q, BLOCK_M) x B for the old one (here 7 x 67 = 469 against 7 x 3 x 64 = 1344); decode
    programs past their sequence's split count do nothing."""
    spy = _Spy(prefill_mod.prefill_kernel, run=False)
    monkeypatch.setattr(prefill_mod, "prefill_kernel", spy)
    q, kc, vc, meta = _batch([1] * 63 + [130], [5] * 63 + [130], 7, 1, 64, torch.bfloat16, device, seed=1)
    attention(q, kc, vc, meta, 0.125, prefill_cfg=AttnConfig(64, 64, 4, 2), num_splits=1)
    (grid,) = spy.grids
    assert grid == (7, (63 + 130) // 64 + 64)


def test_single_long_prompt_block_order(device):
    """A prompt of 3 query blocks plus spare block numbers: every block is computed once, whichever order the
    reversed numbering issues them in (BLOCK_M 16 tiles so the interpreter stays quick)."""
    q, kc, vc, meta = _batch([45, 2], [45, 60], 2, 1, 64, torch.float32, device, seed=9)
    with poisoned_allocations():
        got = attention(q, kc, vc, meta, 0.125)
    torch.testing.assert_close(got, attention_ref(q, kc, vc, meta, 0.125), **TOL[torch.float32])


@pytest.mark.parametrize("decode_seqs,launches", [(0, 0), (None, 1)])
def test_prefill_only_step_skips_the_decode_launch(monkeypatch, decode_seqs, launches, device):
    """Chunks of 2+ tokens only: with the scheduler's decode_seqs = 0 the decode kernel is not launched at all
    (B x Hk x splits programs that would each exit at once); unknown (None) it still is. Same result either way."""
    spy = _Spy(decode_mod.decode_split_kernel)
    monkeypatch.setattr(decode_mod, "decode_split_kernel", spy)
    q, kc, vc, meta = _batch([12, 3], [12, 40], 4, 2, 64, torch.float32, device, seed=4)
    assert meta.decode_seqs == 0  # make_paged_batch counts them as the runner does
    meta.decode_seqs = decode_seqs
    with poisoned_allocations():
        got = attention(q, kc, vc, meta, 0.125, num_splits=2)
    torch.testing.assert_close(got, attention_ref(q, kc, vc, meta, 0.125), **TOL[torch.float32])
    assert len(spy.grids) == launches
