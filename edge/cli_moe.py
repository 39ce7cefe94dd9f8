"""``edge trace`` and ``edge locality``: routing traces and their local routing consistency."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from edge.errors import EdgeError


def trace(model: Optional[str] = typer.Argument(None, help="Checkpoint, .gguf or bundle; omit for the default model."),
          text: Path = typer.Option(..., "--text", help="UTF-8 text file to route through the model."),
          output: Path = typer.Option(..., "--output", "-o", help="Trace file to write (.npz)."),
          window: int = typer.Option(512, "--window", help="Tokens per independent context window."),
          max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Route at most this many tokens.")) -> None:
    """Record which experts every token uses in every layer (reference engine)."""
    from edge.cli import err, out
    from edge.moe.trace import record_trace
    from edge.sdk import load

    if not text.is_file():
        raise EdgeError(f"{text}: no such text file")
    if window < 1:
        raise EdgeError(f"--window must be >= 1, got {window}")
    with load(model, backend="reference", n_ctx=window) as m:
        tokens = m.tokenize(text.read_text(encoding="utf-8", errors="replace"))[:max_tokens]
        if not tokens:
            raise EdgeError(f"{text} holds no text to route")
        with Progress(TextColumn("routing"), BarColumn(), TextColumn("{task.completed}/{task.total} tokens"),
                      TimeRemainingColumn(), console=err, transient=True) as bar:
            task = bar.add_task("", total=len(tokens))
            tr = record_trace(m.backend, tokens, window=window, model=m.name, source=str(text),
                              progress=lambda done, total: bar.update(task, completed=done))
    output.parent.mkdir(parents=True, exist_ok=True)
    tr.save(output)
    out.print(f"wrote {output}: {tr.n_tokens} tokens x {tr.n_layers} layers x top-{tr.top_k} of {tr.n_experts} experts")


def locality(trace_file: Path = typer.Argument(..., help="Trace written by `edge trace`."),
             plot: Optional[Path] = typer.Option(None, "--plot", help="Write the SCH curves as a PNG."),
             as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON.")) -> None:
    """Local routing consistency: SRP and the SCH hit-rate curve against cache size (moe-lrc)."""
    from edge.cli import out
    from edge.moe.cache import policy_hit_rates
    from edge.moe.locality import WINDOWS, analyze
    from edge.moe.trace import RoutingTrace

    tr = RoutingTrace.load(trace_file)
    windows = tuple(m for m in WINDOWS if m <= tr.n_tokens)
    if not windows:
        raise EdgeError(f"{trace_file} has {tr.n_tokens} tokens; the shortest window needs {WINDOWS[0]}")
    report = analyze(tr, windows)
    if plot:
        from edge.moe.plot import plot_sch

        plot_sch(report, plot, title=f"SCH of {tr.meta.get('model', trace_file.stem)} ({tr.n_tokens} tokens)")
    if as_json:
        out.print_json(json.dumps(report.to_dict()))
        return
    out.print(f"{trace_file.name}: {tr.n_tokens} tokens, {tr.n_layers} layers, top-{tr.top_k} of {tr.n_experts} experts")
    t = Table(title="SRP (best F1 of segment prediction), layer mean", title_justify="left")
    for m in windows:
        t.add_column(f"m={m}", justify="right")
    t.add_row(*(f"{v:.3f}" for v in report.srp.mean(axis=0)))
    out.print(t)
    s = Table(title="SCH hit rate by cache size C per layer, layer mean (cold misses counted)", title_justify="left")
    s.add_column("C")
    s.add_column("C/K", justify="right")
    for m in windows:
        s.add_column(f"m={m}", justify="right")
    warm, cold = report.sch_mean(), report.sch_mean(cold=True)
    for c in range(tr.n_experts):
        s.add_row(str(c + 1), f"{(c + 1) / tr.top_k:.1f}",
                  *(f"{warm[j, c]:.3f} ({cold[j, c]:.3f})" for j in range(len(windows))))
    out.print(s)
    p = Table(title="Cache policies vs Belady (layer-mean hit rate)",
              title_justify="left")
    p.add_column("C")
    for name in ("lru", "lfu", "locality", "belady"):
        p.add_column(name, justify="right")
    for c in sorted({tr.top_k, 2 * tr.top_k, 3 * tr.top_k} & set(range(1, tr.n_experts + 1))):
        p.add_row(str(c), *(f"{v:.3f}" for v in policy_hit_rates(tr, c).values()))
    out.print(p)
    hot = report.hotness
    out.print(f"expert hotness: the hottest expert takes {hot.max(axis=1).mean():.1%} of a layer's activations "
              f"on average (uniform would be {1 / tr.n_experts:.1%})")
    if plot:
        out.print(f"plot: {plot}")


def profile(as_json: bool = typer.Option(False, "--json", help="Print the profile as JSON."),
            refresh: bool = typer.Option(False, "--refresh", help="Measure again even if a fresh profile is cached."),
            storage: Optional[Path] = typer.Option(None, "--storage", help="Measure storage at this folder (default: edge's cache)."),
            ) -> None:
    """Measure this device: CPU and ISA, RAM (total, available, cgroup limit), memory bandwidth,
    storage read speeds, ggml kernel throughput, ONNX Runtime providers, llama.cpp RPC.
    Takes a few seconds; the result is cached for a day."""
    from edge.cli import err, out
    from edge.profile import cached_profile
    from edge.units import format_bytes

    if storage is not None and not storage.is_dir():
        raise EdgeError(f"{storage}: no such folder to measure storage in")
    with err.status("measuring this device"):
        p = cached_profile(refresh=refresh, storage_dir=storage)
    if as_json:
        out.print_json(json.dumps(p.to_dict()))
        return
    t = Table(title=f"{p.name}  ({p.source})", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    fmt = lambda v, unit: "unknown" if v is None else f"{v:,} {unit}"  # noqa: E731
    rows = [
        ("CPU", f"{p.cpu_model}; {p.cores_physical} cores / {p.cores_logical} threads"),
        ("ISA", ", ".join(p.isa) or "-"),
        ("RAM", f"{format_bytes(p.ram_total_bytes)} total, "
                f"{'?' if p.ram_available_bytes is None else format_bytes(p.ram_available_bytes)} available"),
        ("cgroup memory limit", "none" if p.cgroup_limit_bytes is None else format_bytes(p.cgroup_limit_bytes)),
        ("memory bandwidth (copy)", fmt(p.memory_bandwidth_gbps, "GB/s")),
        ("storage sequential (O_DIRECT)", fmt(p.storage_seq_read_mbps, "MB/s")),
        ("storage sequential (buffered, cold)", fmt(p.storage_buffered_read_mbps, "MB/s")),
        ("storage random 4 KiB", fmt(p.storage_rand_read_mbps, "MB/s")),
        ("storage scattered MiB reads (expert loads)", fmt(p.storage_chunk_read_mbps, "MB/s")
         + ("" if p.storage_chunk_latency_ms is None else f" + {p.storage_chunk_latency_ms} ms per read")),
        ("  measured at", p.storage_path or "-"),
        ("ggml Q4_1 GEMV", fmt(p.gemv_q4_gflops, "GFLOP/s")),
        ("ggml Q8_0 GEMV", fmt(p.gemv_q8_gflops, "GFLOP/s")),
        ("ggml graph call (ctypes)", fmt(p.ggml_call_us, "µs")),
        ("expert conversion to Q4_1", fmt(p.convert_mbps, "MB/s")),
        ("llama.cpp fixed cost per layer", fmt(p.llama_layer_us, "µs")),
        ("offload engine fixed cost per layer", fmt(p.offload_layer_us, "µs")),
        ("GPU", p.gpu or "none found"),
        ("ONNX Runtime providers", ", ".join(p.ort_providers) or "-"),
        ("llama.cpp RPC backend", "yes" if p.llama_rpc else "no"),
    ]
    for k, v in rows:
        t.add_row(k, str(v))
    out.print(t)


def plan(model: Optional[str] = typer.Argument(None, help="Checkpoint, .gguf or bundle; omit for the default model."),
         device: str = typer.Option("auto", "--device", help="auto (measure this machine) or a profile in hw-profiles/."),
         budget: Optional[str] = typer.Option(None, "--budget", help="Memory the model may use (default: available now)."),
         context: int = typer.Option(2048, "--context", help="Context length the KV cache must hold."),
         bits: int = typer.Option(4, "--bits", help="Expert bits (2..4)."),
         backend: str = typer.Option("auto", "--backend", help="auto, llamacpp or offload."),
         as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON.")) -> None:
    """Plan how MODEL runs on a device within a memory budget, with predicted speed and memory."""
    from dataclasses import asdict

    from edge.cli import out
    from edge.planner import plan as make_plan
    from edge.sources import read_spec, resolve
    from edge.units import format_bytes, parse_bytes

    src = resolve(model)
    spec = read_spec(src)
    policy_hit = None
    if src.kind == "bundle":
        from edge.bundle import read_manifest

        policy_hit = (read_manifest(src.path).locality or {}).get("policy_hit")
    if device == "auto":
        from edge.profile import cached_profile

        prof = cached_profile()
    else:
        from edge.devices import device_profile

        prof = device_profile(device)
    try:
        budget_bytes = None if budget is None else parse_bytes(budget)
    except ValueError as e:
        raise EdgeError(f"--budget: {e}") from None
    p = make_plan(spec, prof, budget_bytes=budget_bytes, context=context, bits=bits, policy_hit=policy_hit,
                  model_name=src.name, backend=backend)
    if as_json:
        out.print_json(json.dumps(asdict(p)))
        return
    out.print(f"[bold]{p.model}[/] on [bold]{p.device}[/], budget {format_bytes(p.budget_bytes)}, context {p.context}")
    out.print(f"  backend {p.backend}, {p.weight_type}, {p.threads} threads"
              + (f", cache {p.cache_slots_per_layer[0]} experts/layer, prefetch 1 layer" if p.cache_slots_per_layer else ""))
    if p.predicted_decode_tok_s is None:
        out.print(f"  predicted: peak memory {format_bytes(p.predicted_peak_bytes)}; speed unknown (see why)")
    else:
        out.print(f"  predicted: decode {p.predicted_decode_tok_s:.2f} tok/s, prefill {p.predicted_prefill_tok_s:.0f} "
                  f"tok/s, first token {p.predicted_ttft_s:.2f} s, peak memory {format_bytes(p.predicted_peak_bytes)}")
    out.print("  why:")
    for r in p.reasons:
        out.print(f"   - {r}", markup=False)


def deploy(model: Optional[str] = typer.Argument(None, help="Hugging Face checkpoint; omit for the default model."),
           device: str = typer.Option("auto", "--device", help="auto (measure this machine) or a profile name."),
           budget: Optional[str] = typer.Option(None, "--budget", help="Memory the model may use (default: available now)."),
           context: int = typer.Option(2048, "--context", help="Context length to plan for."),
           output: Optional[Path] = typer.Option(None, "--output", "-o", help="Bundle folder (default: NAME-BACKEND)."),
           force: bool = typer.Option(False, "--force", help="Replace an existing bundle.")) -> None:
    """Profile -> plan -> build the bundle for that plan -> smoke-run it, with a summary."""
    from edge.cli import err, out
    from edge.deploy import deploy as run_deploy
    from edge.units import format_bytes, parse_bytes

    try:
        budget_bytes = None if budget is None else parse_bytes(budget)
    except ValueError as e:
        raise EdgeError(f"--budget: {e}") from None
    with err.status("deploying") as status:
        p, path, smoke = run_deploy(model, output, device=device, budget_bytes=budget_bytes, context=context,
                                    force=force, say=lambda msg: status.update(msg))
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    t = Table(title=f"deployed {p.model} -> {path}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    for k, v in [("device", p.device), ("backend", p.backend + (f", {p.cache_slots_per_layer[0]} experts cached per layer"
                                                                 if p.cache_slots_per_layer else "")),
                 ("bundle", f"{format_bytes(size)} ({p.weight_type})"), ("budget", format_bytes(p.budget_bytes)),
                 ("predicted decode", "unknown" if p.predicted_decode_tok_s is None else f"{p.predicted_decode_tok_s:.2f} tok/s"),
                 ("smoke run decode", f"{smoke['decode_tok_s']:.2f} tok/s (16 tokens)"),
                 ("smoke run output", repr(smoke["text"][:60]))]:
        t.add_row(k, str(v))
    out.print(t)
    out.print(f"next: edge run \"...\" -m {path}" + (f" --memory-budget {p.budget_bytes}" if p.backend == "offload" else "")
              + f"   |   edge bench {path}")


def bench(bundle: Path = typer.Argument(..., help="A bundle made by edge deploy."),
          tokens: int = typer.Option(64, "--tokens", help="Tokens to decode.")) -> None:
    """Run a deployed bundle as planned; print predicted vs measured speed and memory."""
    from edge.cli import out
    from edge.deploy import measure, read_plan
    from edge.units import format_bytes

    p = read_plan(bundle)
    got = measure(bundle, p, tokens=tokens)
    t = Table(title=f"{bundle}: {p.backend} on {p.device}", title_justify="left")
    for c in ("", "predicted", "measured", "error"):
        t.add_column(c, justify="right" if c else "left")

    def row(name, pred, meas, fmt):
        err_pct = "-" if pred is None else f"{(pred - meas) / meas * 100:+.1f}%"
        t.add_row(name, "unknown" if pred is None else fmt(pred), fmt(meas), err_pct)

    row("decode tokens/s", p.predicted_decode_tok_s, got["decode_tok_s"], lambda v: f"{v:.2f}")
    row("time to first token s", p.predicted_ttft_s, got["ttft_s"], lambda v: f"{v:.3f}")
    row("peak memory", p.predicted_peak_bytes, got["peak_rss_bytes"], format_bytes)
    out.print(t)
