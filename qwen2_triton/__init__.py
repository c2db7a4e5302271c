"""qwen2-triton: serve Qwen2-family models through its own Triton kernels.

    from qwen2_triton import LLM, SamplingParams
    llm = LLM(model="path/to/checkpoint-dir-or-file.gguf")
    print(llm.generate("def fib(n):", SamplingParams(max_tokens=32, temperature=0))[0].text)
"""
from qwen2_triton.runtime.async_llm import AsyncLLM
from qwen2_triton.runtime.llm import LLM
from qwen2_triton.runtime.sampling_params import CompletionOutput, RequestOutput, SamplingParams
from qwen2_triton.runtime.structured_output import StructuredOutput

__all__ = ["LLM", "AsyncLLM", "SamplingParams", "StructuredOutput", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
