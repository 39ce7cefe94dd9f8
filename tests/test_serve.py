"""``edge serve`` as its users use it: a real server process on 127.0.0.1 with the default model,
driven by the official ``openai`` client (sync and async) and raw HTTP for the SSE framing;
admission under overload, client disconnects, Prometheus metrics. Bounded in count and time."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")

KEY = "test-key-1234"
CHAT = [{"role": "user", "content": "read a file line by line"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args: str, env: dict | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "serve", "--port", str(self.port), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stderr.read())
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("edge serve did not become ready in 120 s")

    def client(self, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, **kw)

    def metrics(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=5).text
        return {s.name + (str(sorted(s.labels.items())) if s.labels else ""): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    def stop(self) -> str:
        self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err


@pytest.fixture(scope="module")
def server():
    s = Server("--api-key", KEY, "--concurrency", "1", "--queue-size", "2")
    yield s
    s.stop()


def test_models_completions_and_chat(server):
    c = server.client()
    (m,) = c.models.list().data
    assert m.id == "edge-default-moe"
    r = c.completions.create(model=m.id, prompt="def fibonacci(", max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8 and r.choices[0].text
    r = c.chat.completions.create(model=m.id, messages=CHAT, max_tokens=6, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens == 6
    # the same text as the SDK gives for the same request
    import edge

    with edge.load() as local:
        want = local.create_chat_completion(CHAT, max_tokens=6, temperature=0)["choices"][0]["message"]["content"]
    assert r.choices[0].message.content == want


def test_streams_and_usage_only_when_asked(server):
    c = server.client()
    chunks = list(c.chat.completions.create(model="x", messages=CHAT, max_tokens=10, seed=4, stream=True))
    assert all(ch.usage is None for ch in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    whole = c.chat.completions.create(model="x", messages=CHAT, max_tokens=10, seed=4)
    assert text == whole.choices[0].message.content
    chunks = list(c.completions.create(model="x", prompt="import ", max_tokens=7, stream=True,
                                       stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    assert all(ch.usage is None for ch in chunks[:-1])


def test_seed_length_logprobs(server):
    c = server.client()
    a, b = (c.completions.create(model="x", prompt="class ", max_tokens=12, temperature=1.0, seed=9).choices[0].text
            for _ in range(2))
    assert a == b
    r = c.completions.create(model="x", prompt="class ", max_tokens=1)
    assert r.choices[0].finish_reason == "length"
    r = c.chat.completions.create(model="x", messages=CHAT, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob == t.top_logprobs[0].logprob and t.logprob < 0 for t in content)  # greedy: the best one


def test_refusals(server):
    c = server.client()
    for bad in (dict(n=2), dict(tools=[{"type": "function", "function": {"name": "f"}}]),
                dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}})):
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model="x", messages=CHAT, max_tokens=2, **bad)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong").models.list()
    assert httpx.get(server.url + "/health").status_code == 200  # no key needed


def test_sse_framing(server):
    body = {"model": "x", "prompt": "def ", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    for e in events[:-1]:
        assert json.loads(e[len("data: "):])["object"] == "text_completion"


def test_async_client(server):
    async def main():
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY)
        r = await c.completions.create(model="x", prompt="import ", max_tokens=3)
        stream = await c.chat.completions.create(model="x", messages=CHAT, max_tokens=3, stream=True)
        texts = [ch.choices[0].delta.content async for ch in stream if ch.choices]
        return r, texts

    r, texts = asyncio.run(main())
    assert r.usage.completion_tokens == 3 and len(texts) >= 2


def test_overload_gets_429_past_the_queue_and_metrics_add_up(server):
    """Concurrency 1, queue 2: of 1 + 2 + 2 requests at once, exactly 2 get 429 with an integer
    Retry-After; the waiting gauge never passes 2; the generation counter's increase equals the
    completion tokens reported."""
    before = server.metrics()
    c = server.client(max_retries=0)
    results, peak_waiting, stop = [], [0.0], threading.Event()

    def ask(i: int) -> None:
        try:
            # long enough that all five arrive while the first generates: the default model makes
            # 150 tokens in ~40 ms on a fast 2-core VM, less than the arrivals' spread
            r = c.completions.create(model="x", prompt="def ", max_tokens=1500, temperature=0)
            results.append(("ok", r.usage.completion_tokens))
        except openai.RateLimitError as e:
            results.append(("429", e.response.headers.get("retry-after")))

    def watch() -> None:
        while not stop.is_set():
            peak_waiting[0] = max(peak_waiting[0], server.metrics()["edge:num_requests_waiting"])
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(5)]
    for i, t in enumerate(threads):
        t.start()
        time.sleep(0.15 if i == 0 else 0.05)  # the first is generating before the rest arrive
    for t in threads:
        t.join(timeout=120)
    stop.set()
    watcher.join()
    rejected = [r for r in results if r[0] == "429"]
    assert len(results) == 5 and len(rejected) == 2, results
    assert all(ra is not None and ra.isdigit() for _, ra in rejected)
    assert peak_waiting[0] <= 2
    after = server.metrics()
    assert after["edge:num_requests_running"] == 0 and after["edge:num_requests_waiting"] == 0
    generated = sum(n for kind, n in results if kind == "ok")
    assert after["edge:generation_tokens_total"] - before["edge:generation_tokens_total"] == generated
    assert all(n > 0 for kind, n in results if kind == "ok")
    # with retries on, the client honours Retry-After and gets through
    busy = threading.Thread(target=ask, args=(9,))
    busy.start()
    time.sleep(0.2)
    extra = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in extra:
        t.start()
    r = server.client(max_retries=5).completions.create(model="x", prompt="x", max_tokens=2)
    assert r.usage.completion_tokens == 2
    for t in [busy, *extra]:
        t.join(timeout=120)


def test_client_disconnect_cancels_the_generation(server):
    before = server.metrics()["edge:generation_tokens_total"]
    body = {"model": "x", "prompt": "def ", "max_tokens": 1500, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 5:  # 3 data events and their blank separators
                break
    t0 = time.time()
    while server.metrics()["edge:num_requests_running"] != 0:
        assert time.time() - t0 < 2, "still generating 2 s after the client left"
        time.sleep(0.05)
    counted = server.metrics()["edge:generation_tokens_total"]
    time.sleep(0.5)
    assert server.metrics()["edge:generation_tokens_total"] == counted  # stopped
    assert 3 <= counted - before < 200  # the tokens made before it stopped are counted; 1,500 would take ~8 s
    assert server.metrics()["edge:requests_total[('outcome', 'cancelled')]"] >= 1


def test_beyond_loopback_without_key_warns():
    s = Server("--host", "0.0.0.0")
    try:
        assert httpx.get(s.url + "/v1/models", timeout=5).status_code == 200
    finally:
        err = s.stop()
    assert "beyond loopback without --api-key" in err


def test_ps_shows_the_running_server(server):
    p = subprocess.run([sys.executable, "-m", "edge.cli", "ps", server.url, "--api-key", KEY, "--json"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    status = json.loads(p.stdout)
    assert status["model"] == "edge-default-moe" and status["backend"] == "reference" and status["context"] == 2048
    p = subprocess.run([sys.executable, "-m", "edge.cli", "ps", server.url], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "401" in p.stderr
    p = subprocess.run([sys.executable, "-m", "edge.cli", "ps", "http://127.0.0.1:9"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and "no edge server" in p.stderr


def test_request_timeout():
    s = Server("--timeout", "1")
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        t0 = time.time()
        with pytest.raises(openai.APIStatusError) as e:
            c.completions.create(model="x", prompt="def ", max_tokens=1800, temperature=0)
        assert e.value.status_code == 504 and time.time() - t0 < 5
        assert s.metrics()["edge:num_requests_running"] == 0
    finally:
        s.stop()


def test_an_onnx_bundle_serves_on_onnx_runtime(tmp_path):
    """edge serve on an ONNX bundle: ONNX Runtime answers the official client, streaming included,
    with the text the SDK gives on the same bundle."""
    import edge

    bundle = tmp_path / "onnx"
    edge.build(None, bundle, format="onnx")
    s = Server(str(bundle), "--api-key", KEY)
    try:
        c = s.client()
        r = c.completions.create(model="x", prompt="def fibonacci(", max_tokens=10, temperature=0)
        chunks = c.chat.completions.create(model="x", messages=CHAT, max_tokens=8, temperature=0, stream=True)
        streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    finally:
        s.stop()
    with edge.load(bundle) as local:
        assert local.backend_name == "ort"
        assert r.choices[0].text == local.create_completion("def fibonacci(", max_tokens=10, temperature=0)["choices"][0]["text"]
        want = local.create_chat_completion(CHAT, max_tokens=8, temperature=0)["choices"][0]["message"]["content"]
    assert streamed == want and r.usage.completion_tokens == 10
