"""``edge run`` and ``edge chat``: generate text with a model, a bundle or a deployed plan."""

from __future__ import annotations

import json
from typing import Optional

import typer

from edge.cli.output import ModelOpt, err, out
from edge.errors import EdgeError


def _load(model, backend, n_ctx, threads, verify, budget=None, options=None):
    from edge.cli.output import say_notes
    from edge.sdk import load

    m = load(model, backend=backend, n_ctx=n_ctx, n_threads=threads, verify=verify, memory_budget=budget,
             offload=options)
    say_notes(m.notes)
    return m


def run(prompt: str = typer.Argument(..., help="Text to complete."),
        model: Optional[str] = ModelOpt,
        backend: str = typer.Option("auto", "--backend", help="auto, reference, llamacpp or offload (a GGUF or offload bundle streamed from disk)."),
        max_tokens: int = typer.Option(128, "--max-tokens", "-n", help="Tokens to generate at most."),
        temperature: float = typer.Option(0.8, "--temperature", "-t", help="0 decodes greedily."),
        top_p: float = typer.Option(0.95, "--top-p"),
        top_k: int = typer.Option(0, "--top-k", help="0 = no top-k cut."),
        seed: Optional[int] = typer.Option(None, "--seed", help="Seed for reproducible sampling."),
        stop: list[str] = typer.Option([], "--stop", help="Stop at this string (repeatable)."),
        stream: bool = typer.Option(True, "--stream/--no-stream", help="Print tokens as they come."),
        n_ctx: Optional[int] = typer.Option(None, "--ctx", help="Context length (default: a deployed bundle's plan, else 2048)."),
        threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: the plan's, else the physical cores)."),
        verify: bool = typer.Option(False, "--verify", help="Re-hash every bundle file before loading."),
        memory_budget: Optional[str] = typer.Option(None, "--memory-budget", help="Offload bundles: the whole process stays under this (e.g. 300MB); default: the plan's."),
        policy: Optional[str] = typer.Option(None, "--policy", help="Offload: expert cache policy (lru, lfu, locality, lrfu; default lrfu: best on real routing, docs/policies.md)."),
        bits: Optional[int] = typer.Option(None, "--bits", help="Offload: bits of the hottest experts (2..4; default: the plan's, else 4)."),
        min_bits: Optional[int] = typer.Option(None, "--min-bits", help="Offload: bits of the coldest experts (HEBF; default 2)."),
        pin_bits: Optional[bool] = typer.Option(None, "--pin-bits/--no-pin-bits", help="Offload: every expert at --bits, no downgrading (a plan pins)."),
        prefetch: Optional[bool] = typer.Option(None, "--prefetch/--no-prefetch", help="Offload: load the next layer's experts ahead (default: the plan's, else on)."),
        elastic: bool = typer.Option(False, "--elastic", help="Offload: follow the memory free right now (resize between --floor and the budget)."),
        floor: Optional[str] = typer.Option(None, "--floor", help="--elastic: never shrink below this budget."),
        metrics: bool = typer.Option(False, "--metrics", help="Print the engine's telemetry as JSON on stderr at the end.")) -> None:
    """Complete one prompt and print prompt + completion. A bundle made by edge deploy runs as its
    plan.json says (one line on stderr says so); each option given overrides that one setting."""
    from edge.sdk import OffloadOptions

    options = OffloadOptions(policy=policy, bits=bits, min_bits=min_bits, pin_bits=pin_bits, prefetch=prefetch)
    if elastic and memory_budget is None:
        raise EdgeError("--elastic needs --memory-budget: the budget it starts from and never exceeds")
    with _load(model, backend, n_ctx, threads, verify, memory_budget, options) as m:
        if elastic:
            m.elastic(floor=floor)
        kw = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop)
        out.print(prompt, end="", markup=False)
        if stream:
            for chunk in m.create_completion(prompt, stream=True, **kw):
                out.print(chunk["choices"][0]["text"], end="", markup=False)
                out.file.flush()
        else:
            out.print(m.create_completion(prompt, **kw)["choices"][0]["text"], end="", markup=False)
        out.print()
        if metrics:
            err.print_json(json.dumps(m.metrics()))


def chat(model: Optional[str] = ModelOpt,
         backend: str = typer.Option("auto", "--backend", help="auto, reference, llamacpp or offload (a GGUF or offload bundle streamed from disk)."),
         max_tokens: int = typer.Option(128, "--max-tokens", "-n"),
         temperature: float = typer.Option(0.7, "--temperature", "-t"),
         seed: Optional[int] = typer.Option(None, "--seed"),
         n_ctx: Optional[int] = typer.Option(None, "--ctx", help="Context length (default: the plan's, else 2048)."),
         threads: Optional[int] = typer.Option(None, "--threads")) -> None:
    """Interactive session: each line you type extends one running text, which the model continues.
    The context is kept between turns (its cache is reused); /reset clears it, /exit or Ctrl-D quits."""
    with _load(model, backend, n_ctx, threads, False) as m:
        err.print(f"[bold]{m.name}[/] on {m.backend_name} — base model: it continues your text. /reset, /exit")
        transcript = ""
        while True:
            try:
                line = input("> ")
            except EOFError:
                break
            if line.strip() == "/exit":
                break
            if line.strip() == "/reset":
                transcript = ""
                continue
            transcript += line + "\n"
            if len(m.tokenize(transcript)) + max_tokens >= m.backend.n_ctx:
                err.print("context full: /reset to start again")
                transcript = transcript[: -len(line) - 1]
                continue
            reply = []
            for chunk in m.create_completion(transcript, max_tokens=max_tokens, temperature=temperature,
                                             seed=seed, stop=["\n\n"], stream=True):
                piece = chunk["choices"][0]["text"]
                reply.append(piece)
                out.print(piece, end="", markup=False)
                out.file.flush()
            out.print()
            transcript += "".join(reply) + "\n"
