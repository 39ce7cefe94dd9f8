"""``edge inspect`` and ``edge build``: what a model is, and bundles made from it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from edge.cli.output import ModelArg, out
from edge.units import format_bytes


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


def build(model: Optional[str] = ModelArg,
          output: Path = typer.Option(..., "--output", "-o", help="Bundle folder to create."),
          format: str = typer.Option("gguf", "--format", help="gguf (llama.cpp backend), edge (reference engine), offload (offload engine) or onnx (ONNX Runtime)."),
          weight_type: Optional[str] = typer.Option(None, "--type", help="gguf: f32, f16, q8_0, q4_0, q4_k_m, ... (default f16); edge: f32 or f16; onnx: int4, int8 or f32 (default int4)."),
          force: bool = typer.Option(False, "--force", help="Replace an existing bundle."),
          threads: int = typer.Option(2, "--threads", help="Threads for quantization."),
          bitstack: bool = typer.Option(False, "--bitstack", help="offload: store attention as a resizable BitStack stack."),
          max_bits: Optional[int] = typer.Option(None, "--max-bits", help="offload: bit planes each expert record stores (2..8; default 8, or 6 from a GGUF)."),
          calibration: Optional[Path] = typer.Option(None, "--calibration", help="offload: UTF-8 text whose routing measures locality (default: the stdlib training split).")) -> None:
    """Build an edge bundle: manifest.json plus checksummed weight files. Offload bundles are built
    from a checkpoint or a GGUF one tensor at a time, in bounded memory (docs/offload.md)."""
    from edge.builder.bundles import build as build_bundle
    from edge.cli.output import reporting

    with reporting("building bundle") as report:
        manifest = build_bundle(model, output, format=format, weight_type=weight_type, force=force,
                                threads=threads, progress=report, bitstack=bitstack, max_bits=max_bits,
                                calibration=calibration)
    size = sum(f.size_bytes for f in manifest.files)
    out.print(f"built {output}  format={manifest.format} type={manifest.weight_type}  "
              f"{len(manifest.files)} files, {format_bytes(size)}")
