"""Serving benchmark: an OpenAI-compatible server under load, measured from the client, as vLLM's
benchmark_serving.py measures it (so the same command measures vLLM, or any OpenAI-compatible server).

    qwen2-triton bench serve --base-url http://127.0.0.1:8000 --num-prompts 200 --max-concurrency 16
    qwen2-triton bench serve --launch --serve-args "--device cpu --max-model-len 1024 --kv-cache-tokens 4096" \\
        --num-prompts 32 --input-len 128 --output-len 64 --max-concurrency 8 --offline-compare

(On CPU the KV pool defaults to max_model_len tokens: 8 streams of 128 + 64 need 1536, hence --kv-cache-tokens.)

Every request streams (SSE) with ignore_eos and max_tokens = --output-len, so each generates exactly that many
tokens. Prompts are random tokens: random ids turned into text by the server's /detokenize and re-tokenized by
/tokenize until the text is --input-len tokens (seeded, so every run sends the same prompts); a server without
those routes gets random common words instead. For --endpoint chat the text is the user message, and the
server's chat template adds its own tokens (the CSV's input-token total is what the server reported).

Per request: TTFT (send -> first content chunk), ITL (between content chunks), TPOT ((latency - TTFT) /
(output tokens - 1)), E2EL (send -> end of stream). Reported: request, output and total token throughput over the
run, and mean / p50 / p99 of each latency; meanwhile /health and /metrics are fetched every --probe-interval
seconds on their own connection, to show whether the server stays responsive while the engine is saturated.

--launch starts ``qwen2-triton serve --serve-args ...`` on a free 127.0.0.1 port and stops it at the end.
--offline-compare (with --launch) then runs the same prompts and sampling settings through offline
``LLM.generate`` (``LLM.chat`` for --endpoint chat) in this process, with the same engine settings and
max_num_seqs capped at --max-concurrency, so both keep the same number of sequences in flight, and reports
server output throughput / offline output throughput: what the HTTP layer costs. Each phase also records the CPU
seconds it spent per output token (server and client processes; the offline process) and the cores all other
processes used meanwhile: on a shared machine the throughput ratio follows the neighbours, the CPU ratio does not.
A crowded CPU also stalls torch's thread team (a descheduled thread holds up the rest); OMP_NUM_THREADS=1 in the
environment (inherited by the launched server) keeps both phases single-threaded there.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass

import httpx  # the async client: streams SSE lines as they arrive

from qwen2_triton.bench.serve_launch import launched_server, serve_namespace
from qwen2_triton.bench.serve_metrics import CpuMeter, RequestResult, compute_metrics, summarize

log = logging.getLogger(__name__)

# Random prompt tokens are drawn from [1000, 30000): above the byte and single-character pieces (which decode to
# fragments that re-tokenize differently), below every current vocabulary's size (Llama 32000, Qwen2 151646).
TOKEN_RANGE = (1000, 30000)
FIX_TRIES = 8  # detokenize -> tokenize rounds to reach the exact length; seeded, so a run is reproducible
WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue "
         "side kind head house service friend father power hour game line end member law car city community name "
         "president team minute idea kid body information back parent face others level office door health person "
         "art war history party result change morning reason research girl guy moment air teacher force "
         "education").split()


# --------------------------------------------------------------------------------------------------- prompts
async def make_prompts(c: httpx.AsyncClient, model: str, n: int, input_len: int, seed: int,
                       source: str) -> list[str]:
    rng = random.Random(seed)
    if source == "tokens":
        try:
            return [await _token_prompt(c, model, input_len, rng) for _ in range(n)]
        except (httpx.HTTPStatusError, KeyError) as e:
            log.warning("random-token prompts need the server's /tokenize and /detokenize (%s); using random "
                        "words", e)
    return [" ".join(rng.choice(WORDS) for _ in range(input_len)) for _ in range(n)]


async def _token_prompt(c: httpx.AsyncClient, model: str, input_len: int, rng: random.Random) -> str:
    """Text that the server tokenizes to exactly input_len tokens (or close, after FIX_TRIES rounds)."""
    ids = [rng.randrange(*TOKEN_RANGE) for _ in range(input_len)]
    for _ in range(FIX_TRIES):
        r = await c.post("/detokenize", json={"model": model, "tokens": ids})
        text = r.raise_for_status().json()["prompt"]
        r = await c.post("/tokenize", json={"model": model, "prompt": text, "add_special_tokens": False})
        back = r.raise_for_status().json()["tokens"]
        if len(back) == input_len:
            break
        # merges across the random boundaries changed the count: keep what it became, cut or extend it
        ids = back[:input_len] + [rng.randrange(*TOKEN_RANGE) for _ in range(input_len - len(back))]
    return text


# -------------------------------------------------------------------------------------------------- requests
def request_body(endpoint: str, model: str, prompt: str, output_len: int, temperature: float) -> dict:
    body = {"model": model, "max_tokens": output_len, "temperature": temperature, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        return {**body, "messages": [{"role": "user", "content": prompt}]}
    return {**body, "prompt": prompt}


async def send(c: httpx.AsyncClient, endpoint: str, body: dict) -> RequestResult:
    """One streamed request, timed per content chunk."""
    res = RequestResult()
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    start = last = time.perf_counter()
    chunks = 0
    try:
        async with c.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    res.error = str(event["error"])
                    return res
                if event.get("usage"):
                    res.prompt_tokens = event["usage"]["prompt_tokens"]
                    res.output_tokens = event["usage"]["completion_tokens"]
                if any(_content(ch, endpoint) for ch in event.get("choices") or ()):
                    now = time.perf_counter()
                    if chunks == 0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last, chunks = now, chunks + 1
        res.latency = time.perf_counter() - start
        res.output_tokens = res.output_tokens or chunks  # a server that sends no usage: one token per chunk
        res.ok = chunks > 0
        res.error = "" if res.ok else "no content streamed"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


def _content(choice: dict, endpoint: str) -> str:
    if endpoint == "chat":
        delta = choice.get("delta") or {}
        return delta.get("content") or delta.get("reasoning_content") or ""
    return choice.get("text") or ""


async def probe(c: httpx.AsyncClient, interval: float, stop: asyncio.Event) -> dict[str, list[float]]:
    """GET /health and /metrics every ``interval`` s until ``stop``; their latencies in seconds."""
    got = {"/health": [], "/metrics": []}
    while interval > 0 and not stop.is_set():
        for path in got:
            t = time.perf_counter()
            try:
                (await c.get(path)).raise_for_status()
                got[path].append(time.perf_counter() - t)
            except httpx.HTTPError as e:
                log.warning("GET %s failed during the run: %s", path, e)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
    return got


@dataclass
class LoadRun:
    prompts: list[str]
    results: list[RequestResult]
    duration: float  # first request sent -> last response ended, seconds
    probes: dict[str, list[float]]  # GET path -> latencies, seconds
    cpu: dict[str, float]  # CpuMeter.stop() of the timed part: server_cpu_s, client_cpu_s, other_cpu_cores


async def run_load(a, base_url: str, headers: dict, server_pid: int | None) -> LoadRun:
    timeout = httpx.Timeout(a.timeout, connect=30)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout, limits=limits) as c, \
            httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout) as probe_client:
        model = a.model or (await c.get("/v1/models")).raise_for_status().json()["data"][0]["id"]
        a.model = model
        prompts = await make_prompts(c, model, a.num_prompts, a.input_len, a.seed, a.prompt_source)
        bodies = [request_body(a.endpoint, model, p, a.output_len, a.temperature) for p in prompts]
        warm = await send(c, a.endpoint, {**bodies[0], "max_tokens": min(a.output_len, 4)})
        if not warm.ok:
            raise RuntimeError(f"the warm-up request to {base_url} failed: {warm.error}")
        gate = asyncio.Semaphore(a.max_concurrency or len(bodies))
        rng = random.Random(a.seed)

        async def gated(body):
            async with gate:
                return await send(c, a.endpoint, body)

        stop = asyncio.Event()
        probing = asyncio.ensure_future(probe(probe_client, a.probe_interval, stop))
        start, tasks, meter = time.perf_counter(), [], CpuMeter({"client": os.getpid(), "server": server_pid})
        for body in bodies:  # Poisson arrivals: exponential gaps at --request-rate per second
            tasks.append(asyncio.ensure_future(gated(body)))
            if a.request_rate != math.inf:
                await asyncio.sleep(rng.expovariate(a.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        stop.set()
        cpu = meter.stop()
        probes = await probing
    return LoadRun(prompts, list(results), duration, probes, cpu)


# ------------------------------------------------------------------------------------------- offline run
def offline_run(a, prompts: list[str]) -> dict[str, float]:
    """Output tokens/s, CPU seconds per output token and the other processes' cores (CpuMeter) of the same prompts
    through offline LLM.generate / LLM.chat, after one warm-up call."""
    from qwen2_triton import LLM, SamplingParams
    from qwen2_triton.cli import _engine_kwargs

    kw = _engine_kwargs(serve_namespace(a.serve_args))
    if a.max_concurrency:
        kw["max_num_seqs"] = min(kw["max_num_seqs"], a.max_concurrency)
    llm = LLM(progress=False, **kw)
    sp = SamplingParams(max_tokens=a.output_len, temperature=a.temperature, ignore_eos=True)

    def run(ps, params):
        if a.endpoint == "chat":
            return llm.chat([[{"role": "user", "content": p}] for p in ps], params)
        return llm.generate(ps, params)

    run(prompts[:1], SamplingParams(max_tokens=min(a.output_len, 4), temperature=a.temperature, ignore_eos=True))
    t, meter = time.perf_counter(), CpuMeter({"offline": os.getpid()})
    outs = run(prompts, sp)
    seconds, cpu = time.perf_counter() - t, meter.stop()
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"offline_output_throughput": tokens / seconds,
            "offline_cpu_ms_per_token": cpu["offline_cpu_s"] / tokens * 1e3,
            "offline_other_cpu_cores": cpu["other_cpu_cores"]}


# ------------------------------------------------------------------------------------------------------ main
def machine() -> str:
    import torch

    from qwen2_triton.bench.cpu_decode import cpu_name

    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return cpu_name() + gpu


def report(m: dict) -> None:
    print(f"{' Serving Benchmark Result ':=^60}")
    rows = [("Successful requests", m["completed"]), ("Failed requests", m["failed"]),
            ("Benchmark duration (s)", m["duration_s"]), ("Total input tokens", m["total_input_tokens"]),
            ("Total generated tokens", m["total_output_tokens"]),
            ("Request throughput (req/s)", m["request_throughput"]),
            ("Output token throughput (tok/s)", m["output_throughput"]),
            ("Total token throughput (tok/s)", m["total_token_throughput"]),
            ("Server CPU per output token (ms)", m["server_cpu_ms_per_token"]),
            ("Client CPU per output token (ms)", m["client_cpu_ms_per_token"]),
            ("Other processes' CPU use (cores)", m["other_cpu_cores"])]
    for name, label in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                        ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency"),
                        ("health", "GET /health while loaded"), ("metrics", "GET /metrics while loaded")):
        rows.append((f"-{label}-", None))
        rows += [(f"{stat.capitalize()} {name.upper()} (ms)", m.get(f"{stat}_{name}_ms"))
                 for stat in ("mean", "p50", "p99") if f"{stat}_{name}_ms" in m]
    if "offline_output_throughput" in m:
        rows += [("-Offline LLM, same requests-", None),
                 ("Offline output throughput (tok/s)", m["offline_output_throughput"]),
                 ("Offline CPU per output token (ms)", m["offline_cpu_ms_per_token"]),
                 ("Other processes' CPU use (cores)", m["offline_other_cpu_cores"]),
                 ("Server / offline output throughput", m["server_over_offline"]),
                 ("Offline / server CPU per output token", m["cpu_offline_over_server"])]
    for label, v in rows:
        if v is None:
            print(f"{label:-^60}")
        else:
            print(f"{label:<44}{v:>16.2f}" if isinstance(v, float) else f"{label:<44}{v:>16}")
    print("=" * 60)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qwen2-triton bench serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default=None, help="the server (default http://127.0.0.1:8000; with --launch: "
                    "the launched one)")
    ap.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default $OPENAI_API_KEY")
    ap.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--request-rate", type=float, default=math.inf,
                    help="requests per second, Poisson arrivals (default inf: all at once)")
    ap.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight (default: no cap)")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--prompt-source", choices=("tokens", "words"), default="tokens",
                    help="random tokens through the server's /detokenize + /tokenize (default), or random words")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    # 0.5 s: each probe pair costs the server's event loop ~1.7 ms of CPU (0.35% of a core at this rate), and a
    # minute's run still gives 120 samples for the p99
    ap.add_argument("--probe-interval", type=float, default=0.5,
                    help="seconds between GET /health + /metrics probes during the run (0: none)")
    ap.add_argument("--timeout", type=float, default=3600, help="per-request read timeout, seconds")
    ap.add_argument("--launch", action="store_true", help="start `qwen2-triton serve SERVE_ARGS` and stop it after")
    ap.add_argument("--serve-args", default="", help='flags for the launched server, e.g. "--device cpu"')
    ap.add_argument("--launch-timeout", type=float, default=900, help="seconds to wait for the launched server")
    ap.add_argument("--offline-compare", action="store_true",
                    help="with --launch: also run the same requests through offline LLM.generate")
    ap.add_argument("--machine", default=None, help="the CSV's machine column (default: this machine's CPU/GPU)")
    ap.add_argument("--out", default="bench/results/serve.csv", help="append a CSV row here ('' for none)")
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.request_rate <= 0 or (a.max_concurrency is not None and a.max_concurrency < 1):
        raise ValueError("--request-rate must be > 0 and --max-concurrency >= 1")
    if a.offline_compare and not a.launch:
        raise ValueError("--offline-compare needs --launch (the offline run takes the launched server's settings)")
    if a.launch and a.base_url:
        raise ValueError("give --launch or --base-url, not both")
    if a.launch:
        serve_namespace(a.serve_args)  # a bad flag fails now, not after a minute of loading
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    server = launched_server(a.serve_args, a.launch_timeout) if a.launch else \
        contextlib.nullcontext(((a.base_url or "http://127.0.0.1:8000").rstrip("/"), None))
    with server as (url, pid):
        run = asyncio.run(run_load(a, url, headers, pid))
    m = compute_metrics(run.results, run.duration)
    for name in ("server", "client"):
        m[f"{name}_cpu_ms_per_token"] = run.cpu[f"{name}_cpu_s"] / max(1, m["total_output_tokens"]) * 1e3
    m["other_cpu_cores"] = run.cpu["other_cpu_cores"]
    for path, values in run.probes.items():
        _, p50, p99 = summarize(values)
        m.update({f"p50_{path[1:]}_ms": p50 * 1e3, f"p99_{path[1:]}_ms": p99 * 1e3})
    for r in run.results:
        if not r.ok:
            log.warning("a request failed: %s", r.error)
    if a.offline_compare:
        m.update(offline_run(a, run.prompts))
        m["server_over_offline"] = m["output_throughput"] / m["offline_output_throughput"]
        server_cpu = m["server_cpu_ms_per_token"]  # 0 when under the clock tick (10 ms) in a tiny run
        m["cpu_offline_over_server"] = m["offline_cpu_ms_per_token"] / server_cpu if server_cpu > 0 else math.nan
    report(m)
    if a.out:
        import torch

        from qwen2_triton.bench.e2e import append_rows

        row = {"date": datetime.date.today().isoformat(), "machine": a.machine or machine(),
               "torch": torch.__version__, "threads": torch.get_num_threads(),  # the launched server inherits it
               "server": f"qwen2-triton serve {a.serve_args}".strip() if a.launch else url, "model": a.model,
               "endpoint": a.endpoint, "num_prompts": a.num_prompts, "request_rate": a.request_rate,
               "max_concurrency": a.max_concurrency or "", "input_len": a.input_len, "output_len": a.output_len,
               "prompt_source": a.prompt_source, "temperature": a.temperature, "seed": a.seed}
        ratios = ("server_over_offline", "cpu_offline_over_server")
        row.update({k: f"{v:.3g}" if k in ratios else f"{v:.2f}" if isinstance(v, float) else v
                    for k, v in m.items()})
        append_rows(a.out, [row])
    return 0 if m["completed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
