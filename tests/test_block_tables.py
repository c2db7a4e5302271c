"""The device block tables (runtime/block_tables.py): only what changed is sent, rows change owner cleanly, and
the eager steps of a whole engine run send each block once."""
from __future__ import annotations

import torch

from checkpoints import make_checkpoint
from qwen2_triton import LLM, SamplingParams
from qwen2_triton.runtime.block_manager import DUMMY_BLOCK
from qwen2_triton.runtime.block_tables import DeviceBlockTables


def rows_hold(t: DeviceBlockTables, tables) -> bool:
    return all(t.table[i, : len(tab)].tolist() == tab for i, tab in enumerate(tables))


def test_growth_takeover_forget_and_padding():
    t = DeviceBlockTables(rows=4, max_blocks=6, device=torch.device("cpu"))
    t.table.fill_(-7)  # poison: every entry a step reads must have been sent
    view = t.update([10, 11], [[3, 4], [5]])
    assert view.shape == (2, 6) and rows_hold(t, [[3, 4], [5]]) and t.sent == 3
    t.update([10, 11], [[3, 4], [5]])  # nothing changed: nothing sent
    assert t.sent == 3 and t.copies == 1
    t.update([10, 11], [[3, 4, 8], [5]])  # 10 grew by a block: one entry
    assert t.sent == 4 and rows_hold(t, [[3, 4, 8], [5]])
    t.update([11, 10], [[5, 9], [3, 4, 8]])  # the rows swapped: moved on the device, only 11's new block sent
    assert t.moves == 2 and t.sent == 5 and rows_hold(t, [[5, 9], [3, 4, 8]])
    t.forget(10)  # 10 preempted, back in row 1 at the same length with other blocks: resent whole
    t.update([11, 10], [[5, 9], [1, 2, 6]])
    assert t.sent == 8 and rows_hold(t, [[5, 9], [1, 2, 6]])
    t.update([12, 10, 11], [[7], [1, 2, 6], [5, 9]])  # a newcomer takes row 0: 11 moves to row 2, 10 stays
    assert t.moves == 3 and t.sent == 9 and rows_hold(t, [[7], [1, 2, 6], [5, 9]])
    view = t.update([11], [[5, 9]], rows=4)  # a graph bucket of 4: 11 moves to row 0, rows 1-3 are padding
    assert view.shape == (4, 6) and view[1:, 0].tolist() == [DUMMY_BLOCK] * 3 and rows_hold(t, [[5, 9]])
    assert t.moves == 4 and t.sent == 12
    t.update([11], [[5, 9]], rows=4)
    assert t.sent == 12


def test_a_row_taken_by_a_move_is_not_cleared_by_its_old_owner():
    """A caller that never forgot sequence 1 (tensor-parallel workers see fresh ids each step): 2 moves into 1's
    row, and forgetting 1 afterwards must leave 2's table alone."""
    t = DeviceBlockTables(rows=3, max_blocks=4, device=torch.device("cpu"))
    t.update([1, 2], [[5], [6]])
    t.update([2], [[6]])
    t.forget(1)
    t.update([2], [[6, 7]])
    assert t.moves == 1 and t.sent == 3 and rows_hold(t, [[6, 7]])


def test_eager_steps_send_each_block_once(tmp_path, qwen_tokenizer_dir):
    """Chunked prefills mixed with decodes (all eager on the CPU): the entries sent are exactly the blocks the
    requests held (rows that shift when a request finishes move on the device), not a (B, width) table per step,
    and the tokens are those of the same requests run alone."""
    make_checkpoint(str(tmp_path), "qwen2-0.5b", qwen_tokenizer_dir)
    llm = LLM(str(tmp_path), device="cpu", kernels="torch", progress=False, max_model_len=256, block_size=8,
              max_num_batched_tokens=24, max_num_seqs=4)
    prompts = [[(11 * i + 7 * j) % 5000 for j in range(40 + 17 * i)] for i in range(4)]
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    alone = [llm.generate(p, sp)[0].outputs[0].token_ids for p in prompts]
    tables = llm.runner.tables
    sent = tables.sent
    steps = llm.stats()["eager_steps"]
    outs = llm.generate(prompts, sp)
    assert [o.outputs[0].token_ids for o in outs] == alone
    blocks = sum(-(-(len(p) + 12 - 1) // 8) for p in prompts)  # the last token's K/V is never written
    assert llm.stats()["eager_steps"] - steps > 12 and tables.sent - sent == blocks and tables.moves > 0
