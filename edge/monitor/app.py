"""The monitor app: memory against budget, tokens/s and time-to-first-token sparklines, the
expert cache's hit rate per layer as a heat map, what the experts were served at (bits, or a GGUF's
types), SSD MB/s, the BitStack level and the request queue; for a model run across a group of
devices, each member's layers, traffic and state. ``b`` changes the memory budget of an
offload model (through the server's authenticated admin endpoint), ``q`` quits. When the server
cannot be reached it says so and keeps trying; it recovers on the next good scrape."""

from __future__ import annotations

from collections import deque

from textual.app import App, ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer, Input, Sparkline, Static

from edge.monitor.source import Fetch, Snapshot, parse, rates
from edge.units import format_bytes

HEAT = "·░▒▓█"
HISTORY = 60


def heat_row(rates_by_layer: dict[int, float]) -> str:
    """One character per layer, darker for a higher hit rate, and the lowest and highest."""
    if not rates_by_layer:
        return "no expert cache (this model holds every expert)"
    cells = "".join(HEAT[min(len(HEAT) - 1, int(r * (len(HEAT) - 1) + 0.5))] for _, r in sorted(rates_by_layer.items()))
    lo, hi = min(rates_by_layer.values()), max(rates_by_layer.values())
    return f"[{cells}]  {len(rates_by_layer)} layers, {lo:.0%}..{hi:.0%}"


def bars(counts: dict[str, float], width: int = 16) -> str:
    if not counts:
        return "-"
    top = max(counts.values()) or 1
    return "\n".join(f"{k:>6} {int(v):>7} {'█' * max(1, int(v / top * width))}" for k, v in sorted(counts.items()))


def peer_rows(snap: Snapshot, r) -> str:
    """One line per member of the group: the layers it runs, its traffic now, its state."""
    lines = [f"{'member':24} {'layers':>6} {'up KB/s':>9} {'down KB/s':>10}  state"]
    for peer, x in sorted(snap.peers.items()):
        up, down = r.peer_kb_s.get(peer, (0.0, 0.0))
        lines.append(f"{peer:24} {x.get('layers', 0):6.0f} {up:9.1f} {down:10.1f}  {'LOST' if x.get('lost') else 'ok'}")
    if snap.replans:
        lines.append(f"placed again {snap.replans:.0f} time(s) after losing a member")
    return "\n".join(lines)


class Monitor(App):
    CSS_PATH = "monitor.tcss"
    TITLE = "edge monitor"
    AUTO_FOCUS = None  # the budget box is hidden until b: keys go to the bindings
    BINDINGS = [("b", "budget", "memory budget"), ("r", "refresh", "refresh now"), ("q", "quit", "quit")]

    def __init__(self, fetch: Fetch, *, where: str, interval: float = 1.0, set_budget=None):
        super().__init__()
        self.fetch, self.where, self.interval, self.set_budget = fetch, where, interval, set_budget
        self.prev: Snapshot | None = None
        self.tok_history: deque[float] = deque([0.0] * HISTORY, maxlen=HISTORY)
        self.ttft_history: deque[float] = deque([0.0] * HISTORY, maxlen=HISTORY)
        self.connected = False
        self.message = ""

    def compose(self) -> ComposeResult:
        yield Static(f"connecting to {self.where}", id="banner")
        with Horizontal(id="top"):
            with Vertical(classes="panel", id="memory"):
                yield Static("memory", classes="title")
                yield Static("-", id="memory-text")
            with Vertical(classes="panel"):
                yield Static("requests", classes="title")
                yield Static("-", id="queue-text")
        with Horizontal():
            with Vertical(classes="panel"):
                yield Static("tokens/s", classes="title")
                yield Sparkline(list(self.tok_history), id="tok-spark")
                yield Static("-", id="tok-text")
            with Vertical(classes="panel"):
                yield Static("time to first token", classes="title")
                yield Sparkline(list(self.ttft_history), id="ttft-spark")
                yield Static("-", id="ttft-text")
        with Vertical(classes="panel"):
            yield Static("expert cache hit rate per layer", classes="title")
            yield Static("-", id="layers")
        with Horizontal():
            with Vertical(classes="panel"):
                yield Static("experts served at", classes="title")
                yield Static("-", id="bits")
            with Vertical(classes="panel"):
                yield Static("storage and BitStack", classes="title")
                yield Static("-", id="io-text")
        with Vertical(classes="panel", id="peers"):
            yield Static("group: this device and its peers", classes="title")
            yield Static("-", id="peers-text")
        yield Input(placeholder="new memory budget, e.g. 600MB (Enter to apply, Esc to cancel)", id="budget-input")
        yield Footer()

    def on_mount(self) -> None:
        self.poll()
        self.set_interval(self.interval, self.poll)

    def action_refresh(self) -> None:
        self.poll()

    def poll(self) -> None:
        try:
            snap = parse(self.fetch())
        except Exception as e:  # any failure to reach or read the server: shown, and retried
            self.show_disconnected(e)
            return
        self.show(snap)

    def show_disconnected(self, e: Exception) -> None:
        self.connected = False
        banner = self.query_one("#banner", Static)
        banner.add_class("disconnected")
        reason = getattr(e, "reason", None) or e
        banner.update(f"disconnected from {self.where}: {reason}; retrying every {self.interval:g} s")

    def show(self, snap: Snapshot) -> None:
        r = rates(self.prev, snap)
        self.prev = snap
        self.connected = True
        banner = self.query_one("#banner", Static)
        banner.remove_class("disconnected")
        banner.update(f"connected to {self.where}" + (f"  ·  {self.message}" if self.message else ""))
        self.tok_history.append(r.tok_s)
        if r.ttft_s is not None:
            self.ttft_history.append(r.ttft_s)
        self.query_one("#tok-spark", Sparkline).data = list(self.tok_history)
        self.query_one("#ttft-spark", Sparkline).data = list(self.ttft_history)
        self.query_one("#tok-text", Static).update(
            f"{r.tok_s:.1f} now" + (f", engine {snap.engine_tok_s:.1f} decoding" if snap.engine_tok_s else ""))
        last = next((v for v in reversed(self.ttft_history) if v), None)
        self.query_one("#ttft-text", Static).update(f"{last:.3f} s last" if last else "-")
        mem = self.query_one("#memory", Vertical)
        text = format_bytes(snap.resident_bytes)
        if snap.budget_bytes:
            share = snap.resident_bytes / snap.budget_bytes
            text += f" of {format_bytes(snap.budget_bytes)} budget ({share:.0%})"
            mem.set_class(share > 1.0, "over")
            if share > 1.0:
                text += "  OVER BUDGET"
        else:
            mem.set_class(False, "over")
            text += " (no budget)"
        self.query_one("#memory-text", Static).update(text)
        self.query_one("#queue-text", Static).update(f"{snap.running:.0f} running, {snap.waiting:.0f} waiting")
        self.query_one("#layers", Static).update(heat_row(r.layer_hit_rate))
        self.query_one("#bits", Static).update(bars(snap.served))
        hits, queries = snap.cache_hits or sum(snap.layer_hits.values()), snap.cache_queries or sum(snap.layer_queries.values())
        overall = f"{hits / queries:.0%}" if queries else "-"
        stack = f"{snap.stack_level:.0f} blocks" if snap.stack_level is not None else "none"
        self.query_one("#io-text", Static).update(f"SSD {r.ssd_mb_s:.1f} MB/s · hit rate {overall} · BitStack {stack}")

        self.query_one("#peers", Vertical).set_class(bool(snap.peers), "shown")
        if snap.peers:
            self.query_one("#peers-text", Static).update(peer_rows(snap, r))

    def action_budget(self) -> None:
        box = self.query_one("#budget-input", Input)
        box.add_class("shown")
        self.call_after_refresh(box.focus)  # after this key is handled: the "b" is not typed into it

    def on_input_submitted(self, event: Input.Submitted) -> None:
        box = event.input
        box.remove_class("shown")
        value, box.value = event.value.strip(), ""
        if value:
            self.message = self.set_budget(value) if self.set_budget else "this source cannot change the budget"
        self.poll()

    def key_escape(self) -> None:
        self.query_one("#budget-input", Input).remove_class("shown")
