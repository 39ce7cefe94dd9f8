"""``edge serve``: the OpenAI-compatible local server; ``edge ps``: what a running server holds."""

from __future__ import annotations

import json
import os
from typing import Optional

import typer

from edge.cli.output import err, out
from edge.errors import EdgeError


def _load(settings):
    from edge.sdk import load

    return load(settings.model, backend=settings.backend, n_ctx=settings.n_ctx, n_threads=settings.threads,
                memory_budget=settings.memory_budget, chat_template=settings.chat_template, peers=settings.peers,
                ep=settings.ep)


def serve(model: Optional[str] = typer.Argument(None, help="Model folder, GGUF file or bundle (default: EDGE_MODEL, else the embedded default model)."),
          host: Optional[str] = typer.Option(None, "--host", help="Address to bind (default 127.0.0.1; EDGE_HOST)."),
          port: Optional[int] = typer.Option(None, "--port", help="Port (default 8000; EDGE_PORT)."),
          api_key: Optional[str] = typer.Option(None, "--api-key", help="Bearer key required on every request but /health (EDGE_API_KEY)."),
          concurrency: Optional[int] = typer.Option(None, "--concurrency", help="Generations at once, each with its own copy of the model (default 1)."),
          queue_size: Optional[int] = typer.Option(None, "--queue-size", help="Requests that may wait; past it, 429 with Retry-After (default 8)."),
          timeout: Optional[float] = typer.Option(None, "--timeout", help="Seconds a request may take, waiting included (default 600)."),
          backend: Optional[str] = typer.Option(None, "--backend", help="auto, reference, llamacpp, offload or ort (ONNX Runtime)."),
          memory_budget: Optional[str] = typer.Option(None, "--memory-budget", help="Offload engine: the process stays under this."),
          n_ctx: Optional[int] = typer.Option(None, "--ctx", help="Context length."),
          threads: Optional[int] = typer.Option(None, "--threads"),
          chat_template: Optional[str] = typer.Option(None, "--chat-template", help="A Jinja chat template file instead of the model's own."),
          peers: Optional[str] = typer.Option(None, "--peers", help="Run across paired peers: 'auto' (mDNS) or host:port,... (EDGE_PEERS)."),
          ep: Optional[str] = typer.Option(None, "--ep", help="ONNX Runtime's execution provider: cpu, xnnpack, qnn, coreml or openvino (EDGE_EP; implies --backend ort).")) -> None:
    """Serve the model over an OpenAI-compatible API (/v1/completions, /v1/chat/completions,
    /v1/models), with /health, Prometheus /metrics and a bounded request queue."""
    import uvicorn
    from pydantic import ValidationError

    from edge.serve.app import create_app
    from edge.serve.settings import ServeSettings

    given = dict(model=model, host=host, port=port, api_key=api_key, concurrency=concurrency, queue_size=queue_size,
                 request_timeout=timeout, backend=backend, memory_budget=memory_budget, n_ctx=n_ctx, threads=threads,
                 chat_template=chat_template, peers=peers, ep=ep)
    try:
        settings = ServeSettings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as e:
        first = e.errors()[0]
        raise EdgeError(f"serve setting {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    if settings.ep is not None:  # a provider this onnxruntime lacks is refused before the server starts
        from edge.runtime.ort import provider_for

        provider_for(settings.ep)
    if settings.exposed and not settings.api_key:
        err.print(f"warning: serving on {settings.host} beyond loopback without --api-key: anyone who reaches "
                  f"port {settings.port} can use the model", markup=False)
    err.print(f"edge serve: http://{settings.host}:{settings.port}/v1 (loading {settings.model or 'the default model'}; "
              f"/health answers 200 when ready)", markup=False)
    uvicorn.run(create_app(settings, _load), host=settings.host, port=settings.port, log_level="warning")


def ps(url: str = typer.Argument("http://127.0.0.1:8000", help="The server's address."),
       api_key: Optional[str] = typer.Option(None, "--api-key", help="Its key (default: EDGE_API_KEY)."),
       as_json: bool = typer.Option(False, "--json")) -> None:
    """What a running edge server holds: model, backend, memory against budget, context, speed, hit rate."""
    import urllib.error
    import urllib.request

    from edge.units import format_bytes

    key = api_key or os.environ.get("EDGE_API_KEY")
    req = urllib.request.Request(url.rstrip("/") + "/edge/status",
                                 headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            status = json.load(r)
    except urllib.error.HTTPError as e:
        detail = json.loads(e.read() or b"{}").get("error", {}).get("message", e.reason)
        raise EdgeError(f"{url}: {e.code} {detail}") from None
    except (urllib.error.URLError, OSError) as e:
        raise EdgeError(f"no edge server at {url} ({getattr(e, 'reason', e)})") from None
    if as_json:
        out.print_json(json.dumps(status))
        return
    from rich.table import Table

    t = Table("MODEL", "BACKEND", "MEMORY", "CONTEXT", "TOK/S", "HIT RATE", "RUNNING", "WAITING")
    mem = format_bytes(status["resident_bytes"]) if status.get("resident_bytes") else "-"
    if status.get("memory_budget_bytes"):
        mem += f" / {format_bytes(status['memory_budget_bytes'])}"
    t.add_row(status["model"], status["backend"], mem, str(status["context"]),
              f"{status['decode_tok_s']:.1f}" if status.get("decode_tok_s") else "-",
              f"{status['hit_rate']:.0%}" if status.get("hit_rate") is not None else "-",
              str(status["running"]), str(status["waiting"]))
    out.print(t)


def monitor(url: str = typer.Argument("http://127.0.0.1:8000", help="The server's address."),
            api_key: Optional[str] = typer.Option(None, "--api-key", help="Its key (default: EDGE_API_KEY)."),
            interval: float = typer.Option(1.0, "--interval", help="Seconds between scrapes of /metrics.")) -> None:
    """A live view of a running edge server: memory against budget, tokens/s, time to first token,
    expert-cache hit rate per layer, bits served, SSD MB/s, BitStack level, the request queue;
    b changes an offload model's memory budget, q quits."""
    from edge.monitor.app import Monitor
    from edge.monitor.source import ServerSource

    if interval <= 0:
        raise EdgeError(f"--interval must be > 0 seconds, got {interval}")
    source = ServerSource(url, api_key or os.environ.get("EDGE_API_KEY"))
    Monitor(source.metrics_text, where=url, interval=interval, set_budget=source.set_budget).run()
