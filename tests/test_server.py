"""The OpenAI-compatible server against the real `openai` client, on 127.0.0.1, over a tiny random checkpoint:
the same text as the offline API, OpenAI's shapes for streams, log-probs and errors, aborts that free the KV
cache, and a bounded load test."""
from __future__ import annotations

import asyncio
import json
import random

import httpx
import openai
import pytest

from checkpoints import checkpoint_fixture
from live_server import running_server, wait_until
from qwen2_triton import LLM, SamplingParams
from qwen2_triton.runtime.async_llm import AsyncLLM
from qwen2_triton.server.metrics import EngineMetrics

NAME = "tiny-qwen2"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}]
ENGINE = dict(device="cpu", kernels="torch", progress=False, max_model_len=256, max_num_seqs=8)


ckpt = checkpoint_fixture()


@pytest.fixture(scope="module")
def engine(ckpt):
    metrics = EngineMetrics(NAME)
    eng = AsyncLLM(ckpt, observer=metrics, **ENGINE)
    eng.metrics = metrics
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def base_url(engine):
    with running_server(engine, NAME, metrics=engine.metrics) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def offline(ckpt):
    return LLM(ckpt, **ENGINE)


def pool_is_free(engine) -> bool:
    s = engine.stats()
    return s["unfinished"] == 0 and s["kv_blocks_used"] == 0 and s["running"] == 0 and s["waiting"] == 0


def test_models_health_and_metrics(client, base_url, engine):
    (m,) = client.models.list().data
    assert m.id == NAME and m.max_model_len == engine.max_model_len == 256
    assert httpx.get(base_url + "/health").status_code == 200
    client.completions.create(model=NAME, prompt="warm", max_tokens=2, temperature=0)
    text = httpx.get(base_url + "/metrics").text
    for name in ("qwen2_triton:num_requests_running", "qwen2_triton:num_requests_waiting",
                 "qwen2_triton:kv_cache_usage_perc", "qwen2_triton:prompt_tokens_total",
                 "qwen2_triton:generation_tokens_total", "qwen2_triton:time_to_first_token_seconds_bucket",
                 "qwen2_triton:time_per_output_token_seconds_bucket"):
        assert name in text, name


def test_greedy_chat_is_the_offline_chat(client, offline):
    got = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=12, temperature=0)
    want = offline.chat(MESSAGES, SamplingParams(max_tokens=12, temperature=0))[0]
    assert got.choices[0].message.content == want.text and got.choices[0].message.role == "assistant"
    assert got.choices[0].finish_reason == want.finish_reason
    prompt_ids = offline.tokenizer.encode(offline.tokenizer.apply_chat_template(MESSAGES))
    assert got.usage.prompt_tokens == len(prompt_ids)
    assert got.usage.completion_tokens == len(want.token_ids)
    assert got.usage.total_tokens == len(prompt_ids) + len(want.token_ids)


def test_streamed_chat_equals_non_streamed_and_follows_openai_sse(client, base_url):
    kw = dict(model=NAME, messages=MESSAGES, max_tokens=14, temperature=0.9, seed=3)
    whole = client.chat.completions.create(**kw).choices[0]
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    contents = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content is not None]
    assert all(contents), "a content delta was empty"
    assert "".join(contents) == whole.message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == whole.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 14
    # the raw wire format: data: events, [DONE] last
    with httpx.stream("POST", base_url + "/v1/chat/completions", json={**kw, "stream": True}) as r:
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_streamed_completion_equals_non_streamed_with_stop_strings_held_back(client, offline):
    base = offline.generate("The list:", SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0].text
    stop = base[4:7]
    kw = dict(model=NAME, prompt="The list:", max_tokens=10, temperature=0, stop=[stop])
    whole = client.completions.create(**kw).choices[0]
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices)
    assert whole.text == streamed == base[:4] and whole.finish_reason == "stop"


def test_n2_seeded_choices_are_reproducible(client, offline):
    kw = dict(model=NAME, messages=MESSAGES, max_tokens=8, temperature=1.0, seed=11, n=2)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1] and texts == [c.message.content for c in b.choices]
    assert texts[0] != texts[1]  # two different samples
    single = offline.chat(MESSAGES, SamplingParams(max_tokens=8, temperature=1.0, seed=11))[0].text
    assert texts[0] == single  # choice 0 is what n=1 gives
    assert a.usage.completion_tokens == 16
    streamed = {0: "", 1: ""}
    for c in client.chat.completions.create(**kw, stream=True):
        for ch in c.choices:
            streamed[ch.index] += ch.delta.content or ""
    assert [streamed[0], streamed[1]] == texts


def test_chat_logprobs_shape(client, offline):
    got = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True,
                                         top_logprobs=3).choices[0]
    entries = got.logprobs.content
    assert len(entries) == 4 and "".join(e.token for e in entries) == got.message.content
    for e in entries:
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token and len(e.top_logprobs) == 3
        assert e.logprob == max(t.logprob for t in e.top_logprobs)  # greedy: the best one
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)


def test_completion_prompt_forms_echo_and_logprobs(client, offline):
    ids, other = offline.tokenizer.encode("Once upon"), offline.tokenizer.encode("Hello there")
    out = client.completions.create(model=NAME, prompt=[ids, other], max_tokens=3, temperature=0,
                                    echo=True, logprobs=2)
    assert [c.index for c in out.choices] == [0, 1]
    first = out.choices[0]
    want = offline.generate(ids, SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=2, logprobs=2))[0]
    assert first.text == "Once upon" + want.text
    lp = first.logprobs
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(ids) + 3
    assert lp.token_logprobs[1] == pytest.approx(want.prompt_logprobs[1][ids[1]], abs=1e-5)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert out.usage.prompt_tokens == len(ids) + len(other)
    two = client.completions.create(model=NAME, prompt=["Once upon", "Hello there"], max_tokens=3, temperature=0)
    assert [c.text for c in two.choices] == [c.text[len(p):] for c, p in zip(out.choices, ("Once upon", "Hello there"))]


def test_tokenize_detokenize(base_url, offline):
    r = httpx.post(base_url + "/tokenize", json={"prompt": "Hello world"}).json()
    assert r["tokens"] == offline.tokenizer.encode("Hello world") and r["count"] == len(r["tokens"])
    assert httpx.post(base_url + "/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == "Hello world"
    chat = httpx.post(base_url + "/tokenize", json={"messages": MESSAGES}).json()
    assert chat["tokens"] == offline.tokenizer.encode(offline.tokenizer.apply_chat_template(MESSAGES))


BAD = [  # (route, body or raw text, status, param or None, words in the message)
    ("/v1/completions", "{not json", 400, None, "not valid JSON"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature", "valid number"),
    ("/v1/completions", '{"prompt": "x", "temperature": NaN}', 400, "temperature", "finite"),
    ("/v1/completions", '{"prompt": "x", "top_p": Infinity}', 400, "top_p", "finite"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p", "(0, 1]"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    ("/v1/completions", {"prompt": ""}, 400, None, "empty"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 300}, 400, None, "exceeds the model's context of 256"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, 400, "suffix", "not supported"),
    ("/v1/completions", {"prompt": [1, 10**9]}, 400, None, "outside the vocabulary"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model", "does not exist"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt", "Field required"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "at least 1"),
    ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, 400, "top_logprobs", "requires logprobs"),
    ("/v1/chat/completions", {"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}],
                              "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "tool_choice",
     "not among the tools"),
    ("/v1/chat/completions", {"messages": MESSAGES, "tool_choice": "auto"}, 400, "tool_choice", "needs tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages", "content"),
    ("/v1/chat/completions", {"messages": MESSAGES, "presence_penalty": 5}, 400, "presence_penalty", "[-2, 2]"),
]


@pytest.mark.parametrize("route,body,status,param,words", BAD, ids=[f"{i}-{b[4][:20]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(base_url, client, route, body, status,
                                                                     param, words):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) \
        else {"json": body}
    r = httpx.post(base_url + route, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    assert words in err["message"], err["message"]
    if param is not None:
        assert err["param"] == param
    assert client.completions.create(model=NAME, prompt="still", max_tokens=1).choices[0].finish_reason


def test_api_key_and_queue_limit(engine):
    with running_server(engine, NAME, api_key="sekret", max_queued_requests=1) as url:
        assert httpx.get(url + "/health").status_code == 200  # open, as vLLM's
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"
        ok = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
        assert ok.completions.create(model=NAME, prompt="x", max_tokens=1).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()

        async def flood():
            # max_num_seqs=8: 8 run, the 9th waits (the queue of 1 is then full), the 10th must get 503
            async with httpx.AsyncClient(base_url=url, headers={"authorization": "Bearer sekret"},
                                         timeout=120) as c:
                body = {"prompt": "flood", "max_tokens": 200, "ignore_eos": True, "stream": True}
                streams, responses = [], []
                for i in range(9):
                    streams.append(c.stream("POST", "/v1/completions", json=body))
                    responses.append(await streams[-1].__aenter__())
                    # wait for the engine to take it in (admitted for the first 8, queued for the 9th)
                    while engine.num_waiting() != (1 if i == 8 else 0) or engine.stats()["running"] < min(i + 1, 8):
                        await asyncio.sleep(0.02)
                r = await c.post("/v1/completions", json=body)
                for s in streams:
                    await s.__aexit__(None, None, None)  # hang up: each request is aborted
                return r, responses
        r, responses = asyncio.run(flood())
        assert all(x.status_code == 200 for x in responses)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "--max-queued-requests 1" in r.json()["error"]["message"]
    # Nothing may leak either way: the hung-up streams are aborted or, if the hang-up raced the test loop's
    # shutdown, finish their 200 tokens (the abort itself is asserted by test_disconnects_* below).
    wait_until(lambda: pool_is_free(engine), "the flood's requests leave the pool", limit_s=300)


def test_disconnects_abort_streaming_and_non_streaming_requests(base_url, engine):
    body = {"prompt": "long", "max_tokens": 200, "ignore_eos": True}
    with httpx.stream("POST", base_url + "/v1/completions", json={**body, "stream": True}) as r:
        next(r.iter_lines())  # one event, then hang up
    wait_until(lambda: pool_is_free(engine), "a dropped stream is aborted")

    async def hang_up():
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as c:
            task = asyncio.ensure_future(c.post("/v1/completions", json=body))
            while engine.stats()["running"] < 1:
                await asyncio.sleep(0.02)
            task.cancel()  # closes the connection mid-request
            with pytest.raises(asyncio.CancelledError):
                await task
    asyncio.run(hang_up())
    wait_until(lambda: pool_is_free(engine), "a dropped non-streaming request is aborted")
    assert engine.stats()["unfinished"] == 0


def test_load_64_requests_16_concurrent_with_aborts_leaves_nothing_behind(base_url, engine):
    rng = random.Random(0)
    plans = [dict(i=i, stream=rng.random() < 0.5, abort=(i % 8 == 3), max_tokens=rng.randint(4, 24),
                  chat=rng.random() < 0.5) for i in range(64)]
    results = {}

    async def one(c: httpx.AsyncClient, p):
        body = {"max_tokens": p["max_tokens"], "temperature": 0.8, "seed": p["i"], "ignore_eos": True,
                "stream": p["stream"] or p["abort"], "stream_options": {"include_usage": True}}
        if p["chat"]:
            route, body = "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": f"req {p['i']}"}]}
        else:
            route, body = "/v1/completions", {**body, "prompt": f"request {p['i']}:"}
        if not body["stream"]:
            del body["stream_options"]
            results[p["i"]] = (await c.post(route, json=body)).json()
            return
        events = []
        async with c.stream("POST", route, json=body) as r:
            async for line in r.aiter_lines():
                if line:
                    events.append(line)
                if p["abort"] and len(events) >= 3:
                    break  # leaves mid-stream: the server must abort it
        results[p["i"]] = events

    async def run():
        sem = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=base_url, timeout=300) as c:
            async def gated(p):
                async with sem:
                    await one(c, p)
            await asyncio.gather(*(gated(p) for p in plans))
    asyncio.run(run())
    for p in plans:
        got = results[p["i"]]
        if p["abort"]:
            continue
        if p["stream"]:
            assert got[-1] == "data: [DONE]"
            usage = json.loads(got[-2][6:])["usage"]
        else:
            usage = got["usage"]
            assert got["choices"][0]["finish_reason"] == "length"
        assert usage["completion_tokens"] == p["max_tokens"], p
        assert usage["total_tokens"] == usage["prompt_tokens"] + p["max_tokens"]
    wait_until(lambda: pool_is_free(engine), "every block back after the load")


def test_cli_serve_starts_answers_and_stops_on_sigint(ckpt):
    import signal
    import subprocess
    import sys

    from live_server import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "qwen2_triton.cli", "serve", "--model", ckpt, "--device", "cpu",
                             "--kernels", "torch", "--max-model-len", "128", "--port", str(port),
                             "--served-model-name", "m"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        def up():
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
            except httpx.TransportError:
                return False
        wait_until(up, "the server answers /health", limit_s=120)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        assert c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=3).usage.completion_tokens >= 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert "serving m on http://127.0.0.1" in proc.stderr.read().decode()
    finally:
        proc.kill()
