"""The engine core: one continuous batch over every request, stepped by one caller at a time.

``add_request`` queues an EngineRequest, ``abort_requests`` drops requests at the next step boundary, and
``step()`` schedules, runs the model and the sampler, and returns one immutable EngineCoreOutput per request that
advanced. The core never sees text: tokenizing, detokenizing and stop strings belong to the frontends
(runtime/input_processor.py, runtime/output_processor.py), which the offline ``LLM`` and the asyncio
``AsyncLLM`` put around it.

Start-up order: device, dtype and kernel set -> weights -> kernel plan and tuning -> KV pool sized after a
warm-up step -> CUDA graphs captured (inside ModelRunner).
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import torch

from qwen2_triton.model.loader import LoadedModel, load_model
from qwen2_triton.runtime.backend import make_ops
from qwen2_triton.runtime.block_manager import BlockManager
from qwen2_triton.runtime.device import resolve_device
from qwen2_triton.runtime.engine_config import EngineConfig
from qwen2_triton.runtime.kernel_plan import AttentionShape, DeviceInfo, choose_dtype, choose_kernels, plan_kernels
from qwen2_triton.runtime.model_runner import ModelRunner, kv_bytes_per_block, profile_step_memory
from qwen2_triton.runtime.request import EngineCoreOutput, EngineRequest
from qwen2_triton.runtime.rope_mode import RopePolicy
from qwen2_triton.runtime.scheduler import Scheduler
from qwen2_triton.runtime.sequence import Sequence
from qwen2_triton.runtime.structured_output import StructuredOutputManager
from qwen2_triton.runtime.tuning import TuningCache

log = logging.getLogger(__name__)

CPU_DEFAULT_KV_TOKENS = 32768
GRAMMAR_WAIT_S = 0.05  # a step with only grammar-compiling requests waits this long for one (no spinning)


def num_kv_blocks(c: EngineConfig, model, device: torch.device, dtype: torch.dtype, max_model_len: int) -> int:
    """KV-cache blocks this process has room for (a tensor-parallel worker asks the same)."""
    if c.kv_cache_tokens is not None:
        return -(-c.kv_cache_tokens // c.block_size) + 1  # +1: the reserved dummy block
    if device.type == "cuda":
        # vLLM's rule: the KV cache gets what is left of utilization x total after the weights and the
        # peak of the largest step, measured by a warm-up step on dummy tokens.
        step_peak = profile_step_memory(model, c.max_num_batched_tokens, c.block_size, dtype)
        free, total = torch.cuda.mem_get_info(device)
        usable = free - (1 - c.gpu_memory_utilization) * total - step_peak
        n = int(usable // kv_bytes_per_block(model, c.block_size, dtype))
        if n < 2:
            raise ValueError(f"no GPU memory left for the KV cache ({free / 2**30:.1f} GiB free, a step needs "
                             f"{step_peak / 2**30:.1f} GiB); raise gpu_memory_utilization or pass kv_cache_tokens")
        return n
    # CPU: room for one full-length sequence, capped so a YaRN-extended context does not claim GBs unasked
    return -(-min(max_model_len, CPU_DEFAULT_KV_TOKENS) // c.block_size) + 1


@dataclass
class LaunchedCoreStep:
    """A step ``EngineCore.launch`` queued: outputs already known (requests whose grammar failed) and, when
    something was scheduled, its chunks and the runner's in-flight step."""
    outputs: list[EngineCoreOutput]
    chunks: list | None = None
    runner_step: object = None  # runtime/model_runner.LaunchedStep


class EngineCore:
    def __init__(self, config: EngineConfig):
        self.tp = None  # runtime/tp_driver.py TPDriver with tensor_parallel_size > 1
        try:
            self._start(config)
        except BaseException:
            self.close()  # workers already started must not outlive a failed start
            raise

    def _start(self, config: EngineConfig) -> None:
        self.config = c = config
        model = c.model
        if isinstance(model, LoadedModel):
            self.device, self.dtype = model.model.device, model.model.dtype
            info = DeviceInfo.of(self.device)
            reasons = [f"dtype {str(self.dtype).replace('torch.', '')}, kernels={model.model.ops.name}: "
                       "from the LoadedModel passed in"]
        else:
            self.device = resolve_device(c.device)
            info = DeviceInfo.of(self.device)
            self.dtype, why_dtype = choose_dtype(c.dtype, info)
            kernel_set, why_kernels = choose_kernels(c.kernels, info)
            reasons = [why_dtype, why_kernels]
        if model is None:
            from qwen2_triton.model.demo import demo_model_path

            model = demo_model_path()
        if isinstance(model, LoadedModel):  # already built (random weights for benchmarks)
            loaded, self.ops = model, model.model.ops
        else:
            if c.tensor_parallel_size > 1:  # checks the shapes, then starts the other ranks; no weight loaded yet
                from qwen2_triton.runtime.tp_driver import start_engine_group

                self.tp = start_engine_group(c, model, self.device, self.dtype, kernel_set)
                self.device = self.tp.tp.device
            self.ops = make_ops(kernel_set, self.device)
            loaded = load_model(model, self.dtype, self.device, self.ops, progress=c.progress,
                                quantization=c.quantization,
                                tp=self.tp.tp if self.tp else None)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer  # the tokenizer is for the frontends
        self.eos_token_ids = loaded.eos_token_ids
        self.generation_defaults = loaded.generation_defaults if c.generation_config == "auto" else {}
        cfg = self.model.cfg
        self.vocab_size = cfg.vocab_size
        self.rope = RopePolicy.of(c.rope_scaling, cfg)  # which RoPE table each request gets
        self.max_model_len = self.rope.max_model_len(min(c.max_model_len or cfg.max_model_len, cfg.max_model_len))
        # Kernel choices and tuning come before the KV pool is sized and before graphs are captured.
        shape = AttentionShape.of(self.model.local_cfg, c.block_size)  # this rank's heads under tensor parallelism
        quant = None
        if self.ops.name == "triton":  # quantized projections' shapes, timed on the model's own weights
            from qwen2_triton.runtime.quant_tuning import quant_shapes

            quant = quant_shapes(self.model.params)
        self.plan = plan_kernels(info, self.dtype, self.ops.name, shape,
                                 tune_now=c.tune, reasons=reasons, device=self.device,
                                 cache=TuningCache(c.tuning_cache) if c.tuning_cache is not None else None,
                                 quant=quant)
        if hasattr(self.ops, "use_plan"):
            self.ops.use_plan(self.plan)
        if self.tp:
            self.tp.send_setup(self.plan, self.max_model_len)
        num_blocks = self._num_kv_blocks()
        if self.tp:  # every rank's pool holds the same blocks: the smallest any rank has room for
            num_blocks = self.tp.agree_num_blocks(num_blocks)
        self.blocks = BlockManager(num_blocks, c.block_size, enable_prefix_caching=c.enable_prefix_caching)
        # Grammars (structured output): nothing is built until a request asks for one.
        self.structured = StructuredOutputManager(self.tokenizer, self.vocab_size, self.eos_token_ids,
                                                  max_num_seqs=c.max_num_seqs)
        self.runner = ModelRunner(self.model, num_blocks, c.block_size, self.dtype, max_num_seqs=c.max_num_seqs,
                                  max_model_len=self.max_model_len, enforce_eager=c.enforce_eager,
                                  structured=self.structured)
        self.scheduler = Scheduler(self.blocks, c.max_num_seqs, c.max_num_batched_tokens,
                                   on_release=self.runner.release, eos_token_ids=self.eos_token_ids,
                                   structured=self.structured)
        if self.tp:
            self.runner.on_step = self.tp.send_step
            self.tp.ready()
        # the frontends' step loops (runtime/step_loop.py) overlap output processing with the next step
        self.async_output = c.async_output == "on" or (c.async_output == "auto" and self.device.type == "cuda")
        self._seq_ids = itertools.count()
        for line in self.describe():
            log.info("%s", line)

    def describe(self) -> list[str]:
        """The start-up report: kernel choices with their reasons, graphs, the KV pool."""
        graphs = self.runner.decode_graphs
        cfg = self.model.cfg
        return [*self.plan.describe(),
                f"decode CUDA graphs for batch sizes {graphs.buckets}" if graphs else
                "decode runs eagerly (no CUDA device, kernels=torch, or enforce_eager)",
                "async output: a step's outputs are processed while the device runs the next one"
                if self.async_output else "async output off: outputs are processed between steps "
                f"({'async_output=off' if self.config.async_output == 'off' else 'no CUDA device'})",
                f"{cfg.num_hidden_layers} layers, {self.dtype}, {self.device}, kernels={self.ops.name}; KV cache "
                f"{self.blocks.capacity_tokens} tokens in {self.blocks.num_blocks} blocks of {self.blocks.block_size}",
                f"context {self.max_model_len} tokens; {self.rope.describe()}"] + \
            ([self.tp.describe(self.model)] if self.tp else [])

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (idempotent; nothing to do on one device)."""
        if self.tp is not None:
            self.tp.close()

    def _num_kv_blocks(self) -> int:
        return num_kv_blocks(self.config, self.model, self.device, self.dtype, self.max_model_len)

    # ------------------------------------------------------------------------------------------------ requests
    @property
    def capacity_tokens(self) -> int:
        return self.blocks.capacity_tokens

    def add_request(self, req: EngineRequest) -> None:
        total = len(req.prompt_ids) + req.params.max_tokens
        mode = req.rope_mode or self.rope.mode_for(total)
        if total > self.model.rope_lengths.get(mode, -1):  # past its table, a token would read another's rows
            raise ValueError(f"request {req.request_id!r}: rope_mode {mode!r} covers "
                             f"{self.model.rope_lengths.get(mode, 0)} tokens (modes: {self.model.rope_lengths}), "
                             f"the request may reach {total}")
        seq = Sequence(next(self._seq_ids), req.request_id, list(req.prompt_ids), req.params, seed=req.seed,
                       rope_mode=mode)
        seq.kv_key = f"{mode}|{req.cache_salt}"  # prefix-cache key: keys rotated with another table share nothing
        self.scheduler.add(seq)
        self.structured.add(seq)  # its grammar (if any) starts compiling, off this thread

    def abort_requests(self, request_ids) -> None:
        """Free these requests' KV blocks now (call between steps, from the thread that steps the core); unknown
        or finished ids are ignored."""
        self.scheduler.abort(request_ids)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[EngineCoreOutput]:
        """Schedule, run the model and the sampler, and return what each request gained: ``collect(launch())``."""
        return self.collect(self.launch())

    def launch(self) -> "LaunchedCoreStep":
        """Schedule the next step and queue its work on the device without waiting for it (runtime/step_loop.py
        overlaps the frontend's work on the previous step's outputs with it). ``collect`` must follow before the
        next launch, an abort or an added request."""
        failed = self.structured.failed_requests()  # grammars that did not compile end their requests
        self.scheduler.abort(failed)
        outputs = [EngineCoreOutput(rid, finish_reason="abort") for rid in failed]
        chunks = self.scheduler.schedule()
        if not chunks:
            if not self.structured.wait_for_grammars(GRAMMAR_WAIT_S):  # only requests whose grammar compiles
                if self.scheduler.has_work():
                    raise RuntimeError("scheduler produced an empty step with work pending (KV pool too small?)")
            return LaunchedCoreStep(outputs)
        try:
            return LaunchedCoreStep(outputs, chunks, self.runner.launch(chunks, self.blocks))
        except BaseException:  # an error or Ctrl-C mid-step: no half-written block may be reused
            self.scheduler.step_failed(chunks)
            raise

    def collect(self, launched: "LaunchedCoreStep") -> list[EngineCoreOutput]:
        """Wait for a launched step, read its tokens back and apply them: one EngineCoreOutput per request that
        advanced."""
        if not launched.chunks:
            return launched.outputs
        try:
            result = self.runner.collect(launched.runner_step)
        except BaseException:
            self.scheduler.step_failed(launched.chunks)
            raise
        self.blocks.step_done()
        return launched.outputs + self.scheduler.update_from_output(launched.chunks, result)

    def stats(self) -> dict:
        """Counters since start-up:
        graph_replays: decode steps replayed from a captured CUDA graph;
        eager_steps: steps run eagerly (prefill and mixed prefill + decode steps run eagerly by design);
        eager_decode_fallbacks: pure decode steps that ran eagerly although graphs were captured (a batch or a
            context no graph fits): expected 0, warned about once when it happens;
        padded_eager_decodes: decode steps on the padded buffers without a graph (enforce_eager tests on CPU);
        preemptions: sequences recomputed because the KV pool was full;
        running, waiting: requests now in the batch and queued; kv_blocks_used, kv_blocks_total: the KV pool
            (blocks that only hold cached prefixes count as free: they are evicted when needed);
        prefix_cache_queries, prefix_cache_hits: tokens of admitted requests looked up in the prefix cache, and
            of those the ones found there, not computed (vLLM's counters; 0 with enable_prefix_caching=False)."""
        graphs = self.runner.decode_graphs
        return {"graph_replays": graphs.replays if graphs else 0,
                "eager_steps": self.runner.eager_steps,
                "eager_decode_fallbacks": self.runner.eager_decode_fallbacks,
                "padded_eager_decodes": graphs.eager_runs if graphs else 0,
                "preemptions": self.scheduler.num_preemptions,
                "running": len(self.scheduler.running),
                "waiting": len(self.scheduler.waiting),
                "kv_blocks_used": self.blocks.num_used,
                "kv_blocks_total": self.blocks.num_blocks - 1,
                "prefix_cache_queries": self.blocks.prefix_cache_queries,
                "prefix_cache_hits": self.blocks.prefix_cache_hits}
