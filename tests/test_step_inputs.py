"""ModelRunner._prepare's one-token fast path builds exactly what the general path builds, step by step."""
from qwen2_triton import SamplingParams
from qwen2_triton.bench.host import noop_llm
from qwen2_triton.runtime.model_runner import StepInputs


def general_prepare(runner, chunks, blocks) -> StepInputs:
    """The general path alone (every chunk through ranges), as _prepare was before the fast path."""
    s = StepInputs()
    for c in chunks:
        seq = c.seq
        base = len(s.ids)
        s.ids.extend(seq.token_slice(c.start, c.start + c.length))
        s.pos.extend(range(c.start, c.start + c.length))
        off = runner.model.rope_offsets[seq.rope_mode]
        s.rope_rows.extend(range(c.start + off, c.start + c.length + off))
        s.slots.extend(blocks.slot(seq, p) for p in range(c.start, c.start + c.length))
        s.cu.append(len(s.ids))
        s.lens.append(c.start + c.length)
        s.max_q, s.max_k = max(s.max_q, c.length), max(s.max_k, c.start + c.length)
        s.decode_seqs += c.length == 1
        if seq.params.prompt_logprobs is not None:
            for p in range(max(c.start, seq.num_prompt_scored - 1), min(c.start + c.length, len(seq.prompt_ids) - 1)):
                s.logit_rows.append(base + p - c.start)
                s.row_of.append(("prompt", seq, p + 1))
        if c.samples:
            s.sample_rows.append(len(s.row_of))
            s.sample_seqs.append(seq)
            s.logit_rows.append(base + c.length - 1)
            s.row_of.append(("sample", seq, None))
    s.width = max(len(c.seq.block_table) for c in chunks)
    return s


def test_fast_path_matches_the_general_path_through_prefill_chunks_and_decodes():
    llm = noop_llm(4, max_steps=80)
    runner = llm.runner
    llm.scheduler.max_num_batched_tokens = 24  # long prompts are chunked, so steps mix prefill chunks and decodes
    prepare, seen = runner._prepare, []

    def spy(chunks, blocks_):
        got, want = prepare(chunks, blocks_), general_prepare(runner, chunks, blocks_)
        assert got == want, [(c.start, c.length) for c in chunks]
        seen.append(tuple(c.length for c in chunks))
        return got

    runner._prepare = spy
    prompts = [list(range(5, 5 + n)) for n in (1, 40, 7, 60, 3, 2)]
    params = [SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.0 if i % 2 else 0.8, seed=i,
                             prompt_logprobs=1 if i == 2 else None) for i in range(len(prompts))]
    llm.generate(prompts, params)
    assert any(all(n == 1 for n in step) for step in seen)  # pure decode steps
    assert any(1 in step and max(step) > 1 for step in seen)  # mixed steps


def test_runner_counts_the_decode_sequences_of_each_step():
    """AttentionMetadata.decode_seqs (0 lets a step of prefill chunks skip the decode launch) equals the number of
    q_len == 1 sequences in every eager step: prefill-only, mixed and pure decode steps all occur."""
    llm = noop_llm(4, max_steps=80)
    llm.scheduler.max_num_batched_tokens = 24
    model = llm.runner.model
    inner, seen = model.forward, []

    def spy(input_ids, positions, meta, kv_caches, logits_rows, **kw):
        cu = meta.cu_seqlens_q.tolist()
        q_lens = [b - a for a, b in zip(cu, cu[1:])]
        assert meta.decode_seqs == sum(n == 1 for n in q_lens), q_lens
        seen.append(q_lens)
        return inner(input_ids, positions, meta, kv_caches, logits_rows, **kw)

    model.forward = spy
    llm.generate([list(range(5, 5 + n)) for n in (40, 1, 60, 3)],
                 SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.0))
    assert any(1 not in q for q in seen) and any(1 in q and max(q) > 1 for q in seen)
    assert any(set(q) == {1} for q in seen)
