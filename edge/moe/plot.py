"""PNG plots of locality curves (matplotlib, from the ``plot`` extra)."""

from __future__ import annotations

from pathlib import Path

from edge.errors import EdgeError
from edge.moe.locality import LocalityReport


def plot_sch(report: LocalityReport, path: Path, title: str = "") -> None:
    """SCH hit rate against normalised cache size C/K, one curve per window length m
    (solid: moe-lrc's convention, dashed: first accesses counted as misses)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EdgeError("plotting needs matplotlib: pip install 'edge[plot]'") from None
    rho = [c / report.top_k for c in range(1, report.n_experts + 1)]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for j, m in enumerate(report.windows):
        line, = ax.plot(rho, report.sch_mean()[j], marker="o", ms=3, label=f"m = {m}")
        ax.plot(rho, report.sch_mean(cold=True)[j], ls="--", color=line.get_color(), lw=1)
    ax.axvline(2.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("cache size per layer, C / K  (dotted: 2x the active experts)")
    ax.set_ylabel("hit rate (layer mean)")
    ax.set_ylim(0, 1.02)
    ax.set_title(title or "segment cache best hit rate (SCH); dashed: cold misses counted")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
