"""Host work per engine step: the whole engine with the model's forward replaced by a no-op.

    qwen2-triton bench host [--batches 1,64,256] [--steps 200] [--repeats 3] [--path graphs|eager] [--out CSV]

What a decode step costs besides the GPU's work: scheduling, building the step's input tensors, sampling,
applying the results (stops) and the output processor (detokenizing, RequestOutputs). On a GPU that is what
decides small-model decode (a Qwen2-0.5B step is ~0.3-0.7 ms of GPU time on an H100), and it can be measured on
any CPU. The checkpoint is built in memory: a one-layer Qwen2 with a 4,096-token byte-level BPE vocabulary
(a real tokenizers.Tokenizer, so detokenizing is real work); its forward returns rows of a fixed random logits
pool, so every other part of a step runs as in serving.

Per batch size (1/64/256) and mode (greedy; sampled = temperature 0.7, top-k 20, top-p 0.8, repetition penalty
1.05, Qwen2-Instruct's generation_config), all requests decode in lockstep: after two warm-up steps, ``--steps``
steps are timed one by one with each phase timed inside; a row reports the medians (us) of the run with the
lowest median step, of ``--repeats`` runs. ``us_step`` is the step's CPU time (this thread's, which does all the
work: the torch backend runs a step on one thread), so a shared machine's other load does not count; the wall
time is ``wall_us_step``, and the phases are wall times (short enough to be rarely preempted). ``--path graphs`` (default) decodes through the padded static buffers
that CUDA graphs replay on a GPU (runtime/decode_graphs.py, run eagerly here), ``eager`` through the eager path.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import statistics
import subprocess
import time

import torch

log = logging.getLogger(__name__)

VOCAB = 4096
PROMPT_TOKENS = 16
PHASES = ("schedule", "inputs", "sample", "update", "output")
MODES = {
    "greedy": dict(temperature=0.0),
    "sampled": dict(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05),  # Qwen2-Instruct defaults
}


def small_tokenizer(vocab: int = VOCAB):
    """A byte-level BPE tokenizer of ``vocab`` ids built in memory: the 256 bytes, pairs of common characters
    merged into one token, and the two Qwen stop tokens last."""
    from qwen2_triton.model.tokenizer import Tokenizer, _bytes_to_unicode

    alphabet = _bytes_to_unicode()
    byte_tokens = [alphabet[b] for b in range(256)]
    chars = [alphabet[b] for b in b" etaoinshrdlucmfwypvbgkjqxz0123456789ETAOINSHRDLUCMFWYPVBGKJQXZ.,"]
    stops = ["<|endoftext|>", "<|im_end|>"]
    pairs = [a + b for a in chars for b in chars][: vocab - 256 - len(stops)]
    tokens = byte_tokens + pairs + stops
    return Tokenizer.from_gguf_metadata({
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * (len(tokens) - len(stops)) + [3] * len(stops),
        "tokenizer.ggml.merges": [f"{p[0]} {p[1]}" for p in pairs],
        "tokenizer.ggml.eos_token_id": len(tokens) - 1})


def noop_llm(max_num_seqs: int, path: str = "graphs", device: str = "cpu", max_steps: int = 4096):
    """An LLM over a one-layer model whose forward is a no-op returning rows of a random logits pool."""
    from qwen2_triton import LLM
    from qwen2_triton.model.config import Qwen2Config
    from qwen2_triton.model.loader import LoadedModel
    from qwen2_triton.model.qwen2 import Qwen2Model
    from qwen2_triton.runtime.backend import select_ops
    from qwen2_triton.runtime.decode_graphs import DecodeGraphs

    dev = torch.device(device)
    cfg = Qwen2Config.from_dict(dict(
        architectures=["Qwen2ForCausalLM"], hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB, tie_word_embeddings=True,
        rope_theta=1e6, max_position_embeddings=8192, rms_norm_eps=1e-6, head_dim=16))
    model = Qwen2Model(cfg, select_ops("auto", dev), torch.float32, dev)
    tok = small_tokenizer()
    max_len = PROMPT_TOKENS + max_steps
    llm = LLM(LoadedModel(model, tok, {}, tuple(tok.eos_token_ids), "bench-host"), progress=False,
              enforce_eager=True, max_num_seqs=max_num_seqs, max_model_len=max_len,
              max_num_batched_tokens=max(2048, max_num_seqs * PROMPT_TOKENS),
              kv_cache_tokens=max_num_seqs * (max_len + 16))
    g = torch.Generator().manual_seed(0)
    rows = max(max_num_seqs * PROMPT_TOKENS, 2048) + 8
    pool = (torch.randn(rows, VOCAB, generator=g) * 3).to(dev)
    calls = [0]

    def forward(input_ids, positions, meta, kv_caches, logits_rows, **kw):
        n = input_ids.shape[0] if logits_rows is None else logits_rows.shape[0]
        calls[0] += 1
        off = calls[0] % 8  # a different slice each step, so a row's logits change from step to step
        return pool[off: off + n]

    model.forward = forward
    runner = llm.runner
    if path == "graphs" and runner.decode_graphs is None:  # the GPU decode path, without the capture
        runner.decode_graphs = DecodeGraphs(model, runner.kv_caches, max_num_seqs, llm.max_model_len,
                                            llm.blocks.block_size, use_graphs=False, tables=runner.tables)
    elif path == "eager":
        runner.decode_graphs = None
    return llm


class PhaseTimer:
    """Wraps the engine's per-step entry points so each call adds its duration to a phase of the current step."""

    def __init__(self, llm):
        self.now: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        core, runner = llm.core, llm.core.runner
        self._wrap(core.scheduler, "schedule", "schedule")
        self._wrap(runner, "_prepare", "inputs")
        self._wrap(runner, "_execute", "inputs")  # the forward is a no-op: what is left is building its inputs
        self._wrap(runner, "_draw", "sample")
        self._wrap(runner, "_read", "sample")
        self._wrap(core.scheduler, "update_from_output", "update")
        self._wrap(llm.outputs, "process", "output")

    def _wrap(self, obj, name: str, phase: str) -> None:
        fn = getattr(obj, name)

        def timed(*args, **kw):
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                self.now[phase] += time.perf_counter() - t

        setattr(obj, name, timed)

    def reset(self) -> None:
        self.now = dict.fromkeys(PHASES, 0.0)


def measure(llm, timer: PhaseTimer, batch: int, mode: str, steps: int, seed: int = 0) -> dict:
    """One run: ``batch`` requests decoding together; per-step medians in microseconds."""
    from qwen2_triton import SamplingParams

    prompts = [[(131 * r + 7 * j) % (VOCAB - 2) for j in range(PROMPT_TOKENS)] for r in range(batch)]
    params = [SamplingParams(max_tokens=steps + 4, ignore_eos=True, seed=seed + r, **MODES[mode])
              for r in range(batch)]
    states = llm._add(prompts, params)
    sync = torch.cuda.synchronize if llm.device.type == "cuda" else (lambda: None)
    try:
        for _ in range(3):  # the prefill step, then two decode steps
            llm._step()
        assert len(llm.scheduler.running) == batch, "every request must be decoding"
        cpu, wall, phases = [], [], {p: [] for p in PHASES}
        for _ in range(steps):
            timer.reset()
            sync()
            c = time.thread_time()
            t = time.perf_counter()
            llm._step()
            sync()
            wall.append(time.perf_counter() - t)
            cpu.append(time.thread_time() - c)
            for p in PHASES:
                phases[p].append(timer.now[p])
    finally:
        llm._abort(states)
    row = {"us_step": 1e6 * statistics.median(cpu), "wall_us_step": 1e6 * statistics.median(wall)}
    for p in PHASES:
        row[f"{p}_us"] = 1e6 * statistics.median(phases[p])
    row["us_per_seq"] = row["us_step"] / batch
    return row


def run(batches: list[int], modes: list[str], steps: int, repeats: int, path: str, device: str) -> list[dict]:
    llm = noop_llm(max(batches), path=path, device=device, max_steps=steps + 8)
    timer = PhaseTimer(llm)
    rows = []
    for batch in batches:
        for mode in modes:
            runs = [measure(llm, timer, batch, mode, steps) for _ in range(repeats)]
            best = min(runs, key=lambda r: r["us_step"])
            rows.append({"batch": batch, "mode": mode, "path": path, **best})
    by = {(r["batch"], r["mode"]): r for r in rows}
    for r in rows:
        g = by.get((r["batch"], "greedy"))
        r["over_greedy"] = r["us_step"] / g["us_step"] if g else float("nan")
    return rows


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
                              timeout=5, cwd=__file__.rsplit("/", 2)[0]).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="qwen2-triton bench host", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--modes", default="greedy,sampled", help="greedy, sampled or both")
    ap.add_argument("--steps", type=int, default=200, help="timed steps per run")
    ap.add_argument("--repeats", type=int, default=3, help="runs per row; the fastest is reported")
    ap.add_argument("--path", default="graphs", choices=("graphs", "eager"),
                    help="decode through the padded CUDA-graph buffers (default) or the eager path")
    ap.add_argument("--device", default="cpu", help="where the no-op model's logits and the sampler live")
    ap.add_argument("--label", default="", help="a note for the CSV row (e.g. baseline)")
    ap.add_argument("--out", default=None, help="append CSV rows here (e.g. bench/results/host.csv)")
    a = ap.parse_args(argv)
    from qwen2_triton.bench.cpu_decode import cpu_name
    from qwen2_triton.bench.e2e import append_rows

    modes = a.modes.split(",")
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"--modes: unknown {bad}; choose from {list(MODES)}")
    rows = run([int(b) for b in a.batches.split(",")], modes, a.steps, a.repeats, a.path, a.device)
    print(f"{'batch':>5} {'mode':>8} {'us/step':>9} {'us/seq':>7} {'wall us':>9} "
          + " ".join(f"{p:>9}" for p in PHASES) + f" {'x greedy':>8}")
    for r in rows:
        print(f"{r['batch']:>5} {r['mode']:>8} {r['us_step']:>9.1f} {r['us_per_seq']:>7.2f} {r['wall_us_step']:>9.1f} "
              + " ".join(f"{r[p + '_us']:>9.1f}" for p in PHASES) + f" {r['over_greedy']:>8.2f}", flush=True)
    if a.out:
        machine = cpu_name() if a.device == "cpu" else torch.cuda.get_device_name(torch.device(a.device))
        meta = {"date": datetime.date.today().isoformat(), "machine": machine, "threads": torch.get_num_threads(),
                "torch": torch.__version__, "commit": _commit(), "label": a.label, "vocab": VOCAB}
        append_rows(a.out, [{**meta, **{k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in r.items()}}
                            for r in rows])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
