"""A bounded load test of edge serve against llama-cpp-python's server on the same GGUF, one after
the other in one run: bursty arrivals and skewed lengths shaped like BurstGPT's published request
patterns, every request streamed; throughput, time to first token and latency percentiles,
errors, and what each server does past its capacity.

    python bench/serve.py                       # the default model's Q8_0 GGUF, 60 s per server
    python bench/serve.py --gguf model.gguf --seconds 120 --rate 2

Arrivals: a Gamma renewal process with shape 0.5 (coefficient of variation 1.4: requests come in
bursts, as BurstGPT found for conversation traffic, where Poisson would have CV 1) at ``--rate``
requests/s, run at each multiple of ``--loads`` (default 1x, 3x and 10x: the last is past the
default model's capacity on a 2-core machine, where a server shows what it does with more work
than it can do). Lengths: prompts of Zipf-distributed
length (exponent 1.5, 8..512 tokens of held-out stdlib text, the long-tailed request lengths
BurstGPT reports) and a response budget drawn the same way (4..256 tokens). The same seeded
schedule for both servers. Both run with 2 threads and one generation at a time (their defaults);
edge with its queue of 8. llama-cpp-python's server runs through bench/_llama_server.py, which
turns llama.cpp's AMX weight buffers off where they crash (as edge's own backend does there).
Each server is started afresh for each load, so one load's backlog or hang does not decide the
next one's numbers. Results: docs/serve.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def schedule(seconds: float, rate: float, seed: int) -> list[tuple[float, int, int]]:
    """(arrival s, prompt tokens, max tokens) of every request in ``seconds``."""
    rng = np.random.default_rng(seed)
    out, t = [], 0.0
    while True:
        t += rng.gamma(0.5, 1 / (0.5 * rate))
        if t >= seconds:
            return out
        p = int(min(512, 7 + rng.zipf(1.5)))
        m = int(min(256, 3 + rng.zipf(1.5)))
        out.append((t, p, m))


def prompt_text(tokens: int, words: list[str], offset: int) -> str:
    # about one token per word of stdlib source for the default tokenizer; the server reports the real count
    return " ".join(words[offset % (len(words) - 600):][:tokens])


async def one(client, url: str, prompt: str, max_tokens: int, t0: float, arrival: float) -> dict:
    await asyncio.sleep(max(0.0, t0 + arrival - time.perf_counter()))
    start = time.perf_counter()
    first, n, chunks, status, retry = None, 0, 0, None, None
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    try:
        # the whole request within 60 s: httpx's timeout bounds each read, and a wedged stream kept
        # alive by the server's SSE pings (sse-starlette sends one every 15 s) never reaches it
        async with asyncio.timeout(60), client.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            status = r.status_code
            if status == 200:
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        chunk = json.loads(line[6:])
                        if chunk.get("usage"):
                            n = chunk["usage"]["completion_tokens"]
                        elif chunk.get("choices") and chunk["choices"][0].get("text"):
                            chunks += 1
                            first = first or time.perf_counter()
            else:
                retry = r.headers.get("retry-after")
                await r.aread()
    except Exception as e:  # noqa: BLE001 (a server that drops or hangs a request: counted, not fatal)
        return {"status": f"exception {type(e).__name__}", "latency": time.perf_counter() - start}
    end = time.perf_counter()
    # tokens: the server's usage count where it sends one (edge), else its streamed text chunks
    # (llama-cpp-python streams one token per chunk and sends no usage in streams)
    return {"status": status, "ttft": first - start if first else None, "latency": end - start,
            "tokens": n or chunks, "end": end, "retry_after": retry}


async def run_load(url: str, reqs: list, words: list[str]) -> tuple[list[dict], float]:
    import httpx2 as httpx

    limits = httpx.Limits(max_connections=len(reqs) + 1, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits) as client:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(client, url, prompt_text(p, words, i * 37), m, t0, a)
                                     for i, (a, p, m) in enumerate(reqs)))
    return list(res), time.perf_counter() - t0


def start(cmd: list[str], url: str) -> subprocess.Popen:
    import httpx2 as httpx

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{cmd[:4]} exited: {proc.stderr.read()[-500:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    sys.exit(f"{cmd[:4]} not ready in 180 s")


def summary(name: str, load: str, res: list[dict], wall: float) -> str:
    ok = [r for r in res if r["status"] == 200]
    codes: dict[str, int] = {}
    for r in res:
        if r["status"] != 200:
            codes[str(r["status"])] = codes.get(str(r["status"]), 0) + 1
    ttft = sorted(r["ttft"] for r in ok if r["ttft"] is not None)
    lat = sorted(r["latency"] for r in ok)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    tokens = sum(r["tokens"] for r in ok)
    span = wall
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(codes.items())) or "none"
    waits = sorted(float(r["retry_after"]) for r in res if r["status"] == 429 and r.get("retry_after"))
    if waits:
        errors += f" (Retry-After {waits[0]:g}..{waits[-1]:g} s)"
    refused = [r["latency"] for r in res if r["status"] == 429]
    if refused:
        errors += f" (refused in {np.median(refused) * 1000:.0f} ms median)"
    return (f"{name:28s} {load:5s} {len(res):5d} {len(ok):5d} {tokens / span if span else 0:8.1f} "
            f"{pct(ttft, .5):7.2f} {pct(ttft, .95):7.2f} {pct(lat, .5):7.2f} {pct(lat, .95):7.2f} "
            f"{max(lat, default=float('nan')):7.2f}  {errors}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, default=None, help="default: the embedded model as Q8_0, built once")
    ap.add_argument("--root", type=Path, default=Path("/tmp/edge-bench/serve"))
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--rate", type=float, default=1.0, help="requests/s at 1x load")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--loads", default="1,3,10", help="multiples of --rate to run, comma-separated")
    args = ap.parse_args()
    loads = [int(x) for x in args.loads.split(",")]
    import edge
    from edge.data.corpus import stdlib_corpus

    args.root.mkdir(parents=True, exist_ok=True)
    gguf = args.gguf
    if gguf is None:
        gguf = args.root / "default-q8_0" / "model.gguf"
        if not gguf.is_file():
            edge.build(None, gguf.parent, format="gguf", weight_type="q8_0")
    words = stdlib_corpus().heldout_texts()[2].split()
    rates = ", ".join(f"{args.rate * m:g}" for m in loads)
    print(f"{gguf.name}, {args.seconds:.0f} s per load, arrivals Gamma(0.5) at {rates} req/s, seed {args.seed}")
    print(f"{'server':28s} {'load':5s} {'sent':>5s} {'ok':>5s} {'tok/s':>8s} {'ttft50':>7s} {'ttft95':>7s} "
          f"{'lat50':>7s} {'lat95':>7s} {'latmax':>7s}  errors")
    results = {}
    for name in ("edge serve", "llama_cpp.server"):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = ([sys.executable, "-m", "edge.cli", "serve", str(gguf), "--port", str(port), "--threads", "2",
                "--backend", "llamacpp"] if name == "edge serve" else
               [sys.executable, str(Path(__file__).with_name("_llama_server.py")), "--model", str(gguf), "--port",
                str(port), "--n_threads", "2",
                "--n_ctx", "2048"])
        for mult in loads:
            proc = start(cmd, url)
            try:
                reqs = schedule(args.seconds, args.rate * mult, args.seed + mult)
                res, wall = asyncio.run(run_load(url, reqs, words))
                results[(name, mult)] = res
                print(summary(name, f"{mult}x", res, wall), flush=True)
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
    out = args.root / "results.json"
    out.write_text(json.dumps({f"{n} {m}x": r for (n, m), r in results.items()}, default=str))
    print(f"raw results: {out}")


if __name__ == "__main__":
    main()
