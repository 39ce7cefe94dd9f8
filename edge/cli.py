"""The ``edge`` command line. Every user error is one line on stderr and exit code 2
(``--debug`` shows the traceback)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from edge.errors import EdgeError
from edge.units import format_bytes

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Deploy and run Mixture-of-Experts language models on edge devices.")
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)
_state = {"debug": False}

ModelArg = typer.Argument(None, help="Checkpoint folder, .gguf file or bundle; omit for the embedded default model.")
ModelOpt = typer.Option(None, "--model", "-m", help="Checkpoint folder, .gguf file or bundle (default: embedded model).")


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    _state["debug"] = debug


@app.command()
def inspect(model: Optional[str] = ModelArg,
            as_json: bool = typer.Option(False, "--json", help="Print the ModelSpec as JSON.")) -> None:
    """Show a model's architecture and its dense/expert parameter split."""
    from edge.sources import read_spec, resolve

    src = resolve(model)
    spec = read_spec(src)
    if as_json:
        data = spec.to_dict() | {"total_params": spec.total_params, "active_params": spec.active_params}
        out.print_json(json.dumps(data))
        return
    t = Table(title=f"{src.name}  ({src.kind})", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    rows = [
        ("architecture", spec.arch),
        ("layers", spec.n_layers),
        ("hidden size", spec.hidden_size),
        ("attention heads / kv heads", f"{spec.n_heads} / {spec.n_kv_heads}  (head dim {spec.head_dim})"),
        ("experts", f"{spec.n_experts} routed, top-{spec.top_k}"
                    + (f", {spec.n_shared_experts} shared (FFN {spec.shared_expert_ffn_size})" if spec.n_shared_experts else "")),
        ("expert FFN size", spec.expert_ffn_size),
        ("vocabulary", spec.vocab_size),
        ("context length", spec.context_length),
        ("RoPE theta", f"{spec.rope_theta:g}"),
        ("RMSNorm eps", f"{spec.rms_norm_eps:g}"),
        ("parameters", f"{spec.total_params:,}  (active per token {spec.active_params:,})"),
        ("  dense (trunk)", f"{spec.dense_params:,}  {format_bytes(spec.dense_bytes)}"),
        ("  experts", f"{spec.expert_params:,}  {format_bytes(spec.expert_bytes)}"
                      f"  ({format_bytes(spec.expert_bytes_each)} per expert)"),
        ("expert weight type", spec.weight_dtype),
    ]
    for k, v in rows:
        t.add_row(k, str(v))
    out.print(t)


@app.command()
def build(model: Optional[str] = ModelArg,
          output: Path = typer.Option(..., "--output", "-o", help="Bundle folder to create."),
          format: str = typer.Option("gguf", "--format", help="gguf (llama.cpp backend), edge (reference engine) or offload (offload engine)."),
          weight_type: Optional[str] = typer.Option(None, "--type", help="gguf: f32, f16, q8_0, q4_0, q4_k_m, ... (default f16); edge: f32 or f16."),
          force: bool = typer.Option(False, "--force", help="Replace an existing bundle."),
          threads: int = typer.Option(2, "--threads", help="Threads for quantization."),
          bitstack: bool = typer.Option(False, "--bitstack", help="offload: store attention as a resizable BitStack stack.")) -> None:
    """Build an edge bundle: manifest.json plus checksummed weight files."""
    from edge.builder import build as build_bundle

    with err.status("building bundle") as status:
        manifest = build_bundle(model, output, format=format, weight_type=weight_type, force=force,
                                threads=threads, progress=lambda msg: status.update(msg), bitstack=bitstack)
    size = sum(f.size_bytes for f in manifest.files)
    out.print(f"built {output}  format={manifest.format} type={manifest.weight_type}  "
              f"{len(manifest.files)} files, {format_bytes(size)}")


def _load(model, backend, n_ctx, threads, verify, budget=None, options=None):
    from edge.sdk import load

    return load(model, backend=backend, n_ctx=n_ctx, n_threads=threads, verify=verify, memory_budget=budget,
                offload=options)


@app.command()
def run(prompt: str = typer.Argument(..., help="Text to complete."),
        model: Optional[str] = ModelOpt,
        backend: str = typer.Option("auto", "--backend", help="auto, reference or llamacpp."),
        max_tokens: int = typer.Option(128, "--max-tokens", "-n", help="Tokens to generate at most."),
        temperature: float = typer.Option(0.8, "--temperature", "-t", help="0 decodes greedily."),
        top_p: float = typer.Option(0.95, "--top-p"),
        top_k: int = typer.Option(0, "--top-k", help="0 = no top-k cut."),
        seed: Optional[int] = typer.Option(None, "--seed", help="Seed for reproducible sampling."),
        stop: list[str] = typer.Option([], "--stop", help="Stop at this string (repeatable)."),
        stream: bool = typer.Option(True, "--stream/--no-stream", help="Print tokens as they come."),
        n_ctx: int = typer.Option(2048, "--ctx", help="Context length."),
        threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: all cores)."),
        verify: bool = typer.Option(False, "--verify", help="Re-hash every bundle file before loading."),
        memory_budget: Optional[str] = typer.Option(None, "--memory-budget", help="Offload bundles: the whole process stays under this (e.g. 300MB)."),
        policy: str = typer.Option("locality", "--policy", help="Offload: expert cache policy (lru, lfu, locality)."),
        bits: int = typer.Option(4, "--bits", help="Offload: bits of the hottest experts (2..4)."),
        min_bits: int = typer.Option(2, "--min-bits", help="Offload: bits of the coldest experts (HEBF)."),
        pin_bits: bool = typer.Option(False, "--pin-bits", help="Offload: every expert at --bits, no downgrading."),
        prefetch: bool = typer.Option(True, "--prefetch/--no-prefetch", help="Offload: load the next layer's experts ahead."),
        elastic: bool = typer.Option(False, "--elastic", help="Offload: follow the memory free right now (resize between --floor and the budget)."),
        floor: Optional[str] = typer.Option(None, "--floor", help="--elastic: never shrink below this budget."),
        metrics: bool = typer.Option(False, "--metrics", help="Print the engine's telemetry as JSON on stderr at the end.")) -> None:
    """Complete one prompt and print prompt + completion."""
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


@app.command()
def chat(model: Optional[str] = ModelOpt,
         backend: str = typer.Option("auto", "--backend", help="auto, reference or llamacpp."),
         max_tokens: int = typer.Option(128, "--max-tokens", "-n"),
         temperature: float = typer.Option(0.7, "--temperature", "-t"),
         seed: Optional[int] = typer.Option(None, "--seed"),
         n_ctx: int = typer.Option(2048, "--ctx"),
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
            if len(m.tokenize(transcript)) + max_tokens >= n_ctx:
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


from edge.cli_device import bench, deploy, plan, profile  # noqa: E402
from edge.cli_moe import locality, trace  # noqa: E402

app.command()(trace)
app.command()(locality)
app.command()(profile)
app.command()(plan)
app.command()(deploy)
app.command()(bench)


def main() -> None:
    """Entry point: run the app, turning EdgeError and OSError into one-line errors (exit 2)."""
    debug = "--debug" in sys.argv[1:]
    try:
        app(standalone_mode=False)
    except (EdgeError, OSError) as e:
        if debug:
            raise
        msg = str(e) if isinstance(e, EdgeError) else f"{e.strerror or e}: {e.filename or ''}".rstrip(": ")
        err.print(f"error: {msg}", markup=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as e:  # click's usage errors arrive here in non-standalone mode
        import click

        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(2)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
