"""Turns a scheduled step into tensors, runs the model and the sampler, and returns host-side results.

Owns the paged KV cache: one (num_blocks, block_size, Hk, D) tensor each for keys and values per layer.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from qwen2_triton.kernels.attention import AttentionMetadata
from qwen2_triton.model.qwen2 import Qwen2Model
from qwen2_triton.runtime.block_manager import BlockManager
from qwen2_triton.runtime.block_tables import DeviceBlockTables
from qwen2_triton.runtime.decode_graphs import DecodeGraphs
from qwen2_triton.runtime.sampler import top_logprobs
from qwen2_triton.runtime.sampling_state import SamplingState
from qwen2_triton.runtime.scheduler import Chunk

log = logging.getLogger(__name__)


def allocate_kv(model: Qwen2Model, num_blocks: int, block_size: int, kv_dtype: torch.dtype):
    """Per layer, a (num_blocks, block_size, Hk, D) key and value cache."""
    cfg = model.local_cfg  # this rank's KV heads under tensor parallelism
    shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
    return [(torch.zeros(shape, dtype=kv_dtype, device=model.device),
             torch.zeros(shape, dtype=kv_dtype, device=model.device)) for _ in range(cfg.num_hidden_layers)]


def kv_bytes_per_block(model: Qwen2Model, block_size: int, kv_dtype: torch.dtype) -> int:
    cfg = model.local_cfg
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * \
        torch.empty((), dtype=kv_dtype).element_size()


def profile_step_memory(model: Qwen2Model, num_tokens: int, block_size: int, kv_dtype: torch.dtype) -> int:
    """Peak bytes a step of ``num_tokens`` tokens allocates beyond the weights (activations, all-row logits),
    measured by running one on dummy tokens with a throw-away cache (CUDA only)."""
    dev = model.device
    nblk = -(-num_tokens // block_size) + 1
    kv = allocate_kv(model, nblk, block_size, kv_dtype)
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    t = num_tokens
    meta = AttentionMetadata(
        cu_seqlens_q=torch.tensor([0, t], dtype=torch.int32, device=dev),
        seq_lens=torch.tensor([t], dtype=torch.int32, device=dev),
        block_tables=torch.arange(1, nblk, dtype=torch.int32, device=dev)[None],
        slot_mapping=torch.arange(block_size, block_size + t, dtype=torch.int64, device=dev),
        max_seqlen_q=t, max_seqlen_k=t, decode_seqs=int(t == 1))
    logits = model.forward(torch.zeros(t, dtype=torch.int64, device=dev), torch.arange(t, device=dev), meta, kv,
                           torch.arange(t, device=dev))  # all rows' logits: the prompt_logprobs worst case
    logits.log_softmax(-1)  # ... and their log-softmax, which the step also holds
    del logits
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - base
    del kv
    torch.cuda.empty_cache()
    return peak


@dataclass
class StepInputs:
    """A step's flattened tokens (host lists) and the rows whose logits are needed, with what they are for."""
    ids: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    rope_rows: list[int] = field(default_factory=list)  # position + the sequence's rope table offset
    slots: list[int] = field(default_factory=list)
    cu: list[int] = field(default_factory=lambda: [0])
    lens: list[int] = field(default_factory=list)
    logit_rows: list[int] = field(default_factory=list)
    row_of: list[tuple] = field(default_factory=list)  # ("sample", seq, None) | ("prompt", seq, prompt index)
    sample_rows: list[int] = field(default_factory=list)  # indices into row_of (and the logits) of the "sample" rows
    sample_seqs: list = field(default_factory=list)  # ... and their sequences
    max_q: int = 0
    max_k: int = 0
    width: int = 0  # longest block table
    decode_seqs: int = 0  # sequences with one query token (AttentionMetadata.decode_seqs)


@dataclass
class StepResult:
    tokens: dict[int, int]  # seq_id -> sampled token
    logprobs: dict[int, dict[int, float]]  # seq_id -> {token: logprob} for rows that asked
    prompt_logprobs: dict[int, list[dict[int, float]]]  # seq_id -> entries for prompt positions in this chunk


@dataclass
class LaunchedStep:
    """A step queued on the device by ``ModelRunner.launch``: what ``collect`` needs to read it back."""
    s: StepInputs
    batch: object = None  # runtime/sampling_state.SamplingBatch of the sampled rows
    draft: object = None  # runtime/sampler.Draft: the drawn tokens, still on the device
    logprobs: torch.Tensor | None = None  # log-softmax of every logits row, when some row asked
    sample_logprobs: torch.Tensor | None = None  # ... of the sampled rows
    prompt_idx: list[int] = field(default_factory=list)  # rows of row_of that score a prompt token


class ModelRunner:
    def __init__(self, model: Qwen2Model, num_blocks: int, block_size: int, kv_dtype: torch.dtype,
                 max_num_seqs: int, max_model_len: int, enforce_eager: bool, structured=None):
        self.model, self.device, self.block_size = model, model.device, block_size
        self.structured = structured  # runtime/structured_output.StructuredOutputManager: grammar masks, or None
        self.kv_caches = allocate_kv(model, num_blocks, block_size, kv_dtype)
        # the step's block tables on the device, sent as they change (eager steps and decode graphs alike)
        self.tables = DeviceBlockTables(max_num_seqs, -(-max_model_len // block_size), self.device)
        self.decode_graphs = None
        # Only ops without host syncs can be captured: the Triton kernels are; the torch references are not
        # (attention_ref reads the sequence lengths on the host).
        if self.device.type == "cuda" and not enforce_eager and getattr(model.ops, "capturable", False):
            self.decode_graphs = DecodeGraphs(model, self.kv_caches, max_num_seqs, max_model_len, block_size,
                                              use_graphs=True, tables=self.tables)
        self.on_step = None  # called with (chunks, StepInputs) before each step runs
        self.eager_steps = 0  # steps that ran without a graph: prefill and mixed steps, and the fallbacks below
        self.eager_decode_fallbacks = 0  # pure decode steps that ran eagerly although graphs were captured
        # sampling settings, seeds, output indices and penalty histories, per running sequence on the device
        self.sampling = SamplingState(max_num_seqs, model.cfg.vocab_size, max_model_len, self.device)

    def release(self, seq) -> None:
        """The sequence left the running set (finished or preempted)."""
        self.sampling.release(seq)
        self.tables.forget(seq.seq_id)
        if self.decode_graphs is not None and self.decode_graphs.tables is not self.tables:
            self.decode_graphs.forget(seq.seq_id)  # graphs built by hand with tables of their own

    def run(self, chunks: list[Chunk], blocks: BlockManager) -> StepResult:
        """Prepare the step's inputs, run the model (a captured decode graph when one fits) and sample."""
        return self.collect(self.launch(chunks, blocks))

    def launch(self, chunks: list[Chunk], blocks: BlockManager) -> "LaunchedStep":
        """Queue the step's work: inputs, the model and the sampler's draw, with no host sync (on a GPU the
        device may still be computing when this returns). ``collect`` must follow before the next launch."""
        step = self._prepare(chunks, blocks)
        if self.on_step is not None:  # tensor parallelism: every other rank runs this step too (runtime/worker.py)
            self.on_step(chunks, step)
        with self.model.ops.step_context(), torch.inference_mode():  # the sampler writes the step's logits in place
            logits = self._execute(chunks, step)
            return self._draw(logits, step)

    def collect(self, launched: "LaunchedStep") -> StepResult:
        """Read the launched step's tokens (and log-probs) back to the host: the step's one sync."""
        with self.model.ops.step_context(), torch.inference_mode():
            return self._read(launched)

    def _prepare(self, chunks: list[Chunk], blocks: BlockManager) -> "StepInputs":
        s = StepInputs()
        decodes = False
        for c in chunks:
            seq = c.seq
            base = len(s.ids)
            off = self.model.rope_offsets[seq.rope_mode]  # the table the sequence's keys were rotated with
            if c.length == 1 and seq.params.prompt_logprobs is None:
                # One token (a decode, most rows of most steps): what the general path below does, without its
                # ranges and generators (316 -> 86 us a step at batch 256 on this CPU).
                p, n_prompt = c.start, len(seq.prompt_ids)
                s.ids.append(seq.output_ids[p - n_prompt] if p >= n_prompt else seq.prompt_ids[p])
                s.pos.append(p)
                s.rope_rows.append(p + off)
                s.slots.append(blocks.slot(seq, p))
                s.cu.append(base + 1)
                s.lens.append(p + 1)
                s.decode_seqs += 1
                decodes = True
                if p + 1 == n_prompt + len(seq.output_ids):  # c.samples
                    s.sample_rows.append(len(s.row_of))
                    s.sample_seqs.append(seq)
                    s.logit_rows.append(base)
                    s.row_of.append(("sample", seq, None))
                continue
            s.ids.extend(seq.token_slice(c.start, c.start + c.length))
            s.pos.extend(range(c.start, c.start + c.length))
            s.rope_rows.extend(range(c.start + off, c.start + c.length + off))
            s.slots.extend(blocks.slot(seq, p) for p in range(c.start, c.start + c.length))
            s.cu.append(len(s.ids))
            s.lens.append(c.start + c.length)
            s.max_q = max(s.max_q, c.length)
            s.decode_seqs += c.length == 1  # a 1-token chunk with prompt log-probs: the decode kernel's too
            if seq.params.prompt_logprobs is not None:
                # logits at position p score token p+1; only prompt positions not yet scored (a preempted
                # sequence recomputes its prompt but must not report it twice)
                for p in range(max(c.start, seq.num_prompt_scored - 1), min(c.start + c.length, len(seq.prompt_ids) - 1)):
                    s.logit_rows.append(base + p - c.start)
                    s.row_of.append(("prompt", seq, p + 1))
            if c.samples:
                s.sample_rows.append(len(s.row_of))
                s.sample_seqs.append(seq)
                s.logit_rows.append(base + c.length - 1)
                s.row_of.append(("sample", seq, None))
        if decodes:
            s.max_q = max(s.max_q, 1)
        s.max_k = max(s.lens)
        s.width = max(len(c.seq.block_table) for c in chunks)
        return s

    def _execute(self, chunks: list[Chunk], s: "StepInputs") -> torch.Tensor:
        dev, graphs = self.device, self.decode_graphs
        pure_decode = s.max_q == 1 and len(s.row_of) == len(chunks)  # one token per sequence, each sampled
        if graphs is not None and pure_decode and graphs.fits(len(chunks), s.width):
            return graphs.run(s.ids, s.pos, s.slots, s.lens, [c.seq.block_table for c in chunks],
                              [c.seq.seq_id for c in chunks], rope_rows=s.rope_rows)
        self.eager_steps += 1
        if graphs is not None and pure_decode:
            if not self.eager_decode_fallbacks:
                log.warning("a decode step ran without its CUDA graph (no graph fits the batch or context); "
                            "stats()['eager_decode_fallbacks'] counts them")
            self.eager_decode_fallbacks += 1
        if self.tables.fits(len(chunks), s.width):
            tables = self.tables.update([c.seq.seq_id for c in chunks], [c.seq.block_table for c in chunks])
        else:  # (no admitted request outgrows max_model_len; kept for callers that build runners by hand)
            tables = torch.tensor([c.seq.block_table + [0] * (s.width - len(c.seq.block_table)) for c in chunks],
                                  dtype=torch.int32, device=dev)
        meta = AttentionMetadata(
            cu_seqlens_q=torch.tensor(s.cu, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(s.lens, dtype=torch.int32, device=dev),
            block_tables=tables,
            slot_mapping=torch.tensor(s.slots, dtype=torch.int64, device=dev),
            max_seqlen_q=s.max_q, max_seqlen_k=s.max_k, decode_seqs=s.decode_seqs,
        )
        # Always run the model, even when no row needs logits (a prefill chunk that does not reach the end of
        # its prompt): its keys and values must land in the cache.
        return self.model.forward(torch.tensor(s.ids, dtype=torch.int64, device=dev),
                                  torch.tensor(s.pos, dtype=torch.int64, device=dev), meta, self.kv_caches,
                                  torch.tensor(s.logit_rows, dtype=torch.int64, device=dev),
                                  rope_rows=torch.tensor(s.rope_rows, dtype=torch.int64, device=dev))

    def _draw(self, logits: torch.Tensor, s: "StepInputs") -> "LaunchedStep":
        launched = LaunchedStep(s)
        row_of = s.row_of
        if not row_of:
            return launched
        seqs, sample_idx = s.sample_seqs, s.sample_rows
        launched.prompt_idx = [i for i, (kind, _, _) in enumerate(row_of) if kind == "prompt"] \
            if len(sample_idx) < len(row_of) else []
        batch = launched.batch = self.sampling.batch(seqs) if seqs else None  # on the device, reused while it repeats
        need_logprobs = launched.prompt_idx or (batch is not None and batch.logprobs is not None)
        logprobs = launched.logprobs = logits.log_softmax(-1) if need_logprobs else None
        if seqs:
            # The step's logits are its own (a fresh tensor, or a decode graph's output buffer, which the next replay
            # rewrites), so grammar masks and penalties are written into them; the log-probs were taken above.
            every = len(sample_idx) == logits.shape[0]  # every row samples (a decode step): no gather, no copy
            sl = logits if every else logits[sample_idx]
            if batch.grammar and self.structured is not None:  # -inf outside the grammar, before any sampling step
                self.structured.apply_masks(sl, seqs)
            launched.draft = self.sampling.draw(sl, batch)
            if batch.logprobs is not None:
                launched.sample_logprobs = logprobs if every else logprobs[sample_idx]
        return launched

    def _read(self, launched: "LaunchedStep") -> StepResult:
        result = StepResult({}, {}, {})
        s, batch = launched.s, launched.batch
        if launched.draft is not None:
            tokens, tok_list = self.sampling.take(batch, launched.draft)
            result.tokens = dict(zip(batch.key, tok_list))
            if batch.logprobs is not None:
                counts = [seq.params.logprobs for seq in s.sample_seqs]
                dicts = _logprob_dicts(launched.sample_logprobs, tokens, tok_list, counts)
                for seq, d in zip(s.sample_seqs, dicts):
                    if d is not None:
                        result.logprobs[seq.seq_id] = d
        prompt_idx, row_of = launched.prompt_idx, s.row_of
        if prompt_idx:
            targets = [row_of[i][1].prompt_ids[row_of[i][2]] for i in prompt_idx]
            counts = [row_of[i][1].params.prompt_logprobs for i in prompt_idx]
            dicts = _logprob_dicts(launched.logprobs[prompt_idx],
                                   torch.tensor(targets, device=launched.logprobs.device), targets, counts)
            for i, d in zip(prompt_idx, dicts):
                result.prompt_logprobs.setdefault(row_of[i][1].seq_id, []).append(d)
        return result


def _logprob_dicts(logprobs: torch.Tensor, targets: torch.Tensor, target_list: list[int],
                   counts: list[int | None]) -> list[dict[int, float] | None]:
    """Per row: {token: log-prob} of its ``counts[j]`` most likely tokens and its target (the sampled or the prompt
    token); None for a row whose count is None (it did not ask)."""
    chosen, ids, vals = top_logprobs(logprobs, targets, max(n for n in counts if n is not None))
    chosen = chosen.tolist()
    ids, vals = (ids.tolist(), vals.tolist()) if ids is not None else (None, None)
    out = []
    for j, n in enumerate(counts):
        if n is None:
            out.append(None)
            continue
        d = {ids[j][r]: vals[j][r] for r in range(n)} if n else {}
        d[target_list[j]] = chosen[j]
        out.append(d)
    return out
