"""``edge trace`` and ``edge locality``: routing traces and their local routing consistency."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from edge.cli.output import err, out
from edge.errors import EdgeError


def trace(model: Optional[str] = typer.Argument(None, help="Checkpoint, .gguf or bundle; omit for the default model."),
          text: Path = typer.Option(..., "--text", help="UTF-8 text file to route through the model."),
          output: Path = typer.Option(..., "--output", "-o", help="Trace file to write (.npz)."),
          window: int = typer.Option(512, "--window", help="Tokens per independent context window."),
          max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Route at most this many tokens.")) -> None:
    """Record which experts every token uses in every layer (reference engine)."""
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


def locality(trace_file: Path = typer.Argument(..., help="Trace written by `edge trace`, or a .gguf file: the routing recorded while edge ran it."),
             plot: Optional[Path] = typer.Option(None, "--plot", help="Write the SCH curves as a PNG."),
             as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON.")) -> None:
    """Local routing consistency: SRP and the SCH hit-rate curve against cache size (moe-lrc)."""
    from edge.moe.locality import WINDOWS, analyze
    from edge.moe.policies import POLICIES
    from edge.moe.simulate import policy_hit_rates
    from edge.moe.trace import RoutingTrace

    if trace_file.suffix.lower() == ".gguf":
        from edge.routing import recorded

        if not trace_file.is_file():
            raise EdgeError(f"{trace_file}: no such file or folder")
        tr = recorded(trace_file)
        if tr is None:
            raise EdgeError(f"no routing recorded for {trace_file.name} yet: run it on the offload engine first "
                            f"(edge run PROMPT -m {trace_file} --backend offload)")
    else:
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
    for name in (*POLICIES, "belady"):
        p.add_column(name, justify="right")
    for c in sorted({tr.top_k, 2 * tr.top_k, 3 * tr.top_k} & set(range(1, tr.n_experts + 1))):
        p.add_row(str(c), *(f"{v:.3f}" for v in policy_hit_rates(tr, c).values()))
    out.print(p)
    hot = report.hotness
    out.print(f"expert hotness: the hottest expert takes {hot.max(axis=1).mean():.1%} of a layer's activations "
              f"on average (uniform would be {1 / tr.n_experts:.1%})")
    if plot:
        out.print(f"plot: {plot}")

