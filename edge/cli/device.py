"""``edge profile``, ``edge plan``, ``edge deploy`` and ``edge bench``: devices and plans."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from edge.cli.output import err, out
from edge.errors import EdgeError


def profile(as_json: bool = typer.Option(False, "--json", help="Print the profile as JSON."),
            refresh: bool = typer.Option(False, "--refresh", help="Measure again even if a fresh profile is cached."),
            storage: Optional[Path] = typer.Option(None, "--storage", help="Measure storage at this folder (default: edge's cache)."),
            ) -> None:
    """Measure this device: CPU and ISA, RAM (total, available, cgroup limit), memory bandwidth,
    storage read speeds, ggml kernel throughput, ONNX Runtime providers, llama.cpp RPC.
    Takes a few seconds; the result is cached for a day."""
    from edge.device.profile import cached_profile
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
        ("expert conversion to Q4_1", fmt(p.convert_mbps, "MB/s") + {
            True: " (native helper)", False: " (numpy: the native helper is not built, ~3x slower)", None: ""}[p.native_convert]),
        ("llama.cpp fixed cost per layer", fmt(p.llama_layer_us, "µs")),
        ("llama.cpp MoE decode, Q4_1 weights", fmt(p.llama_stream_gbps, "GB/s")),
        ("offload engine fixed cost per layer", fmt(p.offload_layer_us, "µs")),
        ("ONNX Runtime fixed cost per layer", fmt(p.ort_layer_us, "µs")),
        ("ONNX Runtime MoE streaming / llama.cpp's", "-" if p.ort_stream_ratio is None else f"{p.ort_stream_ratio:.2f}x"),
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
         backend: str = typer.Option("auto", "--backend", help="auto, llamacpp, offload or ort (ONNX Runtime)."),
         as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON.")) -> None:
    """Plan how MODEL runs on a device within a memory budget, with predicted speed and memory."""
    from edge.plan.planner import plan as make_plan
    from edge.plan.planner import slots_text
    from edge.sources import read_spec, resolve
    from edge.units import format_bytes, parse_bytes

    src = resolve(model)
    locality = stored = reader = None
    if src.kind == "gguf":  # an offload plan reads it straight from the file, in its own types
        from edge.formats.gguf_read import open_reader, read_spec as read_gguf_spec, stored_experts
        from edge.routing import planning_locality

        reader = open_reader(src.path)  # once: it parses the whole header (4.5 s on a 30B model)
        spec = read_gguf_spec(src.path, reader)
        stored = stored_experts(reader, spec)
        locality = planning_locality(src.path) or None
    else:
        spec = read_spec(src)
    if src.kind == "bundle":
        from edge.formats.bundle import read_manifest

        locality = read_manifest(src.path).locality
    if device == "auto":
        from edge.device.profile import at_bundle, at_gguf, cached_profile

        prof = cached_profile()
        if locality is not None and src.kind == "bundle":  # an offload bundle here: time reads of its own store
            prof = at_bundle(prof, src.path)
        elif stored is not None:  # a MoE GGUF here: time the engine's reads of its experts in the file
            prof = at_gguf(prof, src.path, reader)
    else:
        from edge.device.profiles import device_profile

        prof = device_profile(device)
    try:
        budget_bytes = None if budget is None else parse_bytes(budget)
    except ValueError as e:
        raise EdgeError(f"--budget: {e}") from None
    p = make_plan(spec, prof, budget_bytes=budget_bytes, context=context, bits=bits, locality=locality,
                  model_name=src.name, backend=backend, stored=stored)
    if as_json:
        out.print_json(json.dumps(p.to_dict()))
        return
    out.print(f"[bold]{p.model}[/] on [bold]{p.device}[/], budget {format_bytes(p.budget_bytes)}, context {p.context}")
    out.print(f"  backend {p.backend}, {p.weight_type}, {p.threads} threads"
              + (f", cache {slots_text(p.cache_slots_per_layer)} experts/layer, prefetch "
                 f"{'1 layer' if p.prefetch_layers else 'off'}" if p.cache_slots_per_layer else ""))
    if p.predicted_decode_tok_s is None:
        out.print(f"  predicted: peak memory {format_bytes(p.predicted_peak_bytes)}; speed unknown (see why)")
    else:
        out.print(f"  predicted: decode {p.predicted_decode_tok_s:.2f} tok/s, peak memory "
                  f"{format_bytes(p.predicted_peak_bytes)} (time to first token: not predicted; edge bench measures it)")
    out.print("  why:")
    for r in p.reasons:
        out.print(f"   - {r}", markup=False)


def deploy(model: Optional[str] = typer.Argument(None, help="Hugging Face checkpoint or GGUF file; omit for the default model."),
           device: str = typer.Option("auto", "--device", help="auto (measure this machine) or a profile name."),
           budget: Optional[str] = typer.Option(None, "--budget", help="Memory the model may use (default: available now)."),
           context: int = typer.Option(2048, "--context", help="Context length to plan for."),
           backend: str = typer.Option("auto", "--backend", help="auto (the planner chooses), llamacpp, offload or ort (ONNX Runtime)."),
           output: Optional[Path] = typer.Option(None, "--output", "-o", help="Bundle folder (default: NAME-BACKEND)."),
           force: bool = typer.Option(False, "--force", help="Replace an existing bundle."),
           peers: Optional[str] = typer.Option(None, "--peers", envvar="EDGE_PEERS",
                                               help="Deploy across paired peers: 'auto' (mDNS) or host:port,host:port; "
                                                    "--budget is then what this device holds.")) -> None:
    """Profile -> plan -> build the bundle for that plan -> smoke-run it, with a summary."""
    from edge.deploy import deploy as run_deploy
    from edge.plan.planner import slots_text
    from edge.units import format_bytes, parse_bytes

    try:
        budget_bytes = None if budget is None else parse_bytes(budget)
    except ValueError as e:
        raise EdgeError(f"--budget: {e}") from None
    from edge.cli.output import reporting

    with reporting("deploying") as report:
        p, path, smoke = run_deploy(model, output, device=device, budget_bytes=budget_bytes, context=context,
                                    backend=backend, force=force, peers=peers, say=report)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    t = Table(title=f"deployed {p.model} -> {path}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    group = [("peers", ", ".join(p.peers)), ("split", "; ".join(p.reasons[1:]))] if p.backend == "d2d" else []
    for k, v in [("device", p.device), ("backend", p.backend + (f", {slots_text(p.cache_slots_per_layer)} experts cached per layer"
                                                                 if p.cache_slots_per_layer else "")), *group,
                 ("bundle", f"{format_bytes(size)} ({p.weight_type})"), ("budget", format_bytes(p.budget_bytes)),
                 ("predicted decode", "unknown" if p.predicted_decode_tok_s is None else f"{p.predicted_decode_tok_s:.2f} tok/s"),
                 ("smoke run decode", f"{smoke['decode_tok_s']:.2f} tok/s (16 tokens)"),
                 ("smoke run output", repr(smoke["text"][:60]))]:
        t.add_row(k, str(v))
    out.print(t)
    out.print(f"next: edge run \"...\" -m {path}   (runs as planned: plan.json)   |   edge bench {path}")


def bench(bundle: Path = typer.Argument(..., help="A bundle made by edge deploy."),
          tokens: int = typer.Option(64, "--tokens", help="Tokens to decode."),
          runs: int = typer.Option(3, "--runs", min=1, help="Runs, each from an empty context and expert cache; medians are shown.")) -> None:
    """Run a deployed bundle as planned; print predicted vs measured speed and memory."""
    from edge.deploy import measure, planned
    from edge.units import format_bytes

    p = planned(bundle)
    with err.status(f"running {bundle} as planned ({runs} x {tokens} tokens)"):
        got = measure(bundle, tokens=tokens, runs=runs)
    t = Table(title=f"{bundle}: {p.backend} on {p.device}, median of {runs} runs of {tokens} tokens",
              title_justify="left")
    for c in ("", "predicted", "measured", "error"):
        t.add_column(c, justify="right" if c else "left")

    def row(name, pred, meas, fmt, missing="unknown"):
        err_pct = "-" if pred is None else f"{(pred - meas) / meas * 100:+.1f}%"
        t.add_row(name, missing if pred is None else fmt(pred), fmt(meas), err_pct)

    row("decode tokens/s", p.predicted_decode_tok_s, got["decode_tok_s"], lambda v: f"{v:.2f}")
    row("time to first token s", None, got["ttft_s"], lambda v: f"{v:.3f}", missing="not predicted")
    row("peak memory", p.predicted_peak_bytes, got["peak_rss_bytes"], format_bytes)
    out.print(t)
