"""``edge run`` and ``edge chat``: generate text with a model, a bundle or a deployed plan."""

from __future__ import annotations

import json
from typing import Optional

import typer

from edge.cli.output import ModelOpt, err, out
from edge.errors import EdgeError


PeersOpt = typer.Option(None, "--peers", help="Run across paired peers: 'auto' (mDNS) or host:port,host:port (edge peer serve on each).")


EpOpt = typer.Option(None, "--ep", help="ONNX Runtime's execution provider: cpu, xnnpack, qnn, coreml or openvino (implies --backend ort).")


def _load(model, backend, n_ctx, threads, verify, budget=None, options=None, peers=None, ep=None):
    from edge.cli.output import say_notes
    from edge.sdk import load

    m = load(model, backend=backend, n_ctx=n_ctx, n_threads=threads, verify=verify, memory_budget=budget,
             offload=options, peers=peers, ep=ep)
    say_notes(m.notes)
    return m


def run(prompt: str = typer.Argument(..., help="Text to complete."),
        model: Optional[str] = ModelOpt,
        backend: str = typer.Option("auto", "--backend", help="auto, reference, llamacpp, offload (a GGUF or offload bundle streamed from disk) or ort (ONNX Runtime)."),
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
        metrics: bool = typer.Option(False, "--metrics", help="Print the engine's telemetry as JSON on stderr at the end."),
        peers: Optional[str] = PeersOpt,
        ep: Optional[str] = EpOpt) -> None:
    """Complete one prompt and print prompt + completion. A bundle made by edge deploy runs as its
    plan.json says (one line on stderr says so); each option given overrides that one setting."""
    from edge.sdk import OffloadOptions

    options = OffloadOptions(policy=policy, bits=bits, min_bits=min_bits, pin_bits=pin_bits, prefetch=prefetch)
    if elastic and memory_budget is None:
        raise EdgeError("--elastic needs --memory-budget: the budget it starts from and never exceeds")
    with _load(model, backend, n_ctx, threads, verify, memory_budget, options, peers, ep) as m:
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
         backend: str = typer.Option("auto", "--backend", help="auto, reference, llamacpp, offload (a GGUF or offload bundle streamed from disk) or ort (ONNX Runtime)."),
         max_tokens: int = typer.Option(256, "--max-tokens", "-n", help="Tokens per reply at most."),
         temperature: float = typer.Option(0.7, "--temperature", "-t"),
         seed: Optional[int] = typer.Option(None, "--seed"),
         system: Optional[str] = typer.Option(None, "--system", help="A system message to open the conversation."),
         chat_template: Optional[str] = typer.Option(None, "--chat-template", help="A Jinja chat template file to use instead of the model's own."),
         n_ctx: Optional[int] = typer.Option(None, "--ctx", help="Context length (default: the plan's, else 2048)."),
         threads: Optional[int] = typer.Option(None, "--threads"),
         memory_budget: Optional[str] = typer.Option(None, "--memory-budget", help="Offload engine: the whole process stays under this."),
         peers: Optional[str] = PeersOpt,
         ep: Optional[str] = EpOpt) -> None:
    """A conversation with the model, laid out by its own chat template; the model's tokens of the
    conversation stay cached between turns. /reset starts again, /exit or Ctrl-D quits. A model with
    no chat template continues one running text instead (said once)."""
    from edge.sdk import load

    with load(model, backend=backend, n_ctx=n_ctx, n_threads=threads, memory_budget=memory_budget,
              chat_template=chat_template, peers=peers, ep=ep) as m:
        from edge.cli.output import say_notes

        say_notes(m.notes)
        templated = m.chat_template is not None
        if not templated:
            err.print(f"warning: {m.name} has no chat template: each line continues one running text "
                      f"(--chat-template FILE gives it a chat layout)", markup=False)
        err.print(f"[bold]{m.name}[/] on {m.backend_name}. /reset, /exit")
        opening = [{"role": "system", "content": system}] if system else []
        messages, transcript = list(opening), ""
        while True:
            try:
                line = input("> ")
            except EOFError:
                break
            if line.strip() == "/exit":
                break
            if line.strip() == "/reset":
                messages, transcript = list(opening), ""
                continue
            kw = dict(max_tokens=max_tokens, temperature=temperature, seed=seed, stream=True)
            try:
                if templated:
                    chunks = m.create_chat_completion(messages + [{"role": "user", "content": line}], **kw)
                    texts = (c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
                else:
                    chunks = m.create_completion(transcript + line + "\n", stop=["\n\n"], **kw)
                    texts = (c["choices"][0]["text"] for c in chunks)
                reply = []
                for piece in texts:
                    reply.append(piece)
                    out.print(piece, end="", markup=False)
                    out.file.flush()
            except EdgeError as e:
                if "context holds" not in str(e):
                    raise
                err.print(f"context full ({e}): /reset to start again", markup=False)
                continue
            out.print()
            messages += [{"role": "user", "content": line}, {"role": "assistant", "content": "".join(reply)}]
            transcript += line + "\n" + "".join(reply) + "\n"
