"""``edge monitor`` in a real terminal (Textual's Pilot and SVG snapshots): the values shown are the
metrics it read, its keys work, over-budget shows, a lost server shows and recovers; and once
against a real ``edge serve``."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from edge.monitor.app import Monitor
from edge.monitor.source import parse


def metrics_text(*, resident=300e6, budget=500e6, tokens=1200, running=1, waiting=2, layers=(0.9, 0.5, 0.1, 0.7),
                 served=None, stack=None, ttft=(0.2, 0.4)) -> str:
    """A /metrics page as prometheus_client writes it, with the names edge serve exposes."""
    r = CollectorRegistry()
    Gauge("edge:resident_bytes", "", ["slot"], registry=r).labels("0").set(resident)
    if budget:
        Gauge("edge:memory_budget_bytes", "", ["slot"], registry=r).labels("0").set(budget)
    Counter("edge:generation_tokens", "", registry=r).inc(tokens)
    Gauge("edge:num_requests_running", "", registry=r).set(running)
    Gauge("edge:num_requests_waiting", "", registry=r).set(waiting)
    h = Histogram("edge:time_to_first_token_seconds", "", registry=r)
    for t in ttft:
        h.observe(t)
    q = Counter("edge:expert_cache_layer_queries", "", ["slot", "layer"], registry=r)
    hits = Counter("edge:expert_cache_layer_hits", "", ["slot", "layer"], registry=r)
    for i, rate in enumerate(layers):
        q.labels("0", str(i)).inc(100)
        hits.labels("0", str(i)).inc(100 * rate)
    s = Counter("edge:experts_served", "", ["slot", "bits"], registry=r)
    for bits, n in (served or {"4": 300, "2": 100}).items():
        s.labels("0", bits).inc(n)
    Counter("edge:ssd_read_bytes", "", ["slot"], registry=r).labels("0").inc(5e6)
    if stack is not None:
        Gauge("edge:stack_level", "", ["slot"], registry=r).labels("0").set(stack)
    return generate_latest(r).decode()


def text_of(app, widget_id: str) -> str:
    return str(app.query_one(widget_id).render())


def test_parse_reads_what_the_server_writes():
    s = parse(metrics_text(stack=12))
    assert s.resident_bytes == 300e6 and s.budget_bytes == 500e6 and s.generation_tokens == 1200
    assert s.layer_hits == {0: 90, 1: 50, 2: 10, 3: 70} and s.served == {"4": 300, "2": 100} and s.stack_level == 12
    assert s.ttft_count == 2 and s.ttft_sum == pytest.approx(0.6)


def test_values_shown_are_the_metrics_read():
    async def main():
        app = Monitor(lambda: metrics_text(stack=7), where="test", interval=60)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause()
            assert "286 MiB of 477 MiB budget (60%)" in text_of(app, "#memory-text")
            assert "1 running, 2 waiting" in text_of(app, "#queue-text")
            assert "4 layers, 10%..90%" in text_of(app, "#layers")
            assert "300" in text_of(app, "#bits") and "100" in text_of(app, "#bits")
            assert "BitStack 7 blocks" in text_of(app, "#io-text")
            assert "0.300 s last" in text_of(app, "#ttft-text")  # the mean of the two requests' TTFT
            assert "connected to test" in text_of(app, "#banner")
    asyncio.run(main())


def test_a_group_shows_its_members_their_traffic_and_a_lost_one():
    def page(sent: float, lost: bool) -> str:
        r = CollectorRegistry()
        layers = Gauge("edge:peer_layers", "", ["slot", "peer"], registry=r)
        up = Counter("edge:peer_sent_bytes", "", ["slot", "peer"], registry=r)
        down = Counter("edge:peer_received_bytes", "", ["slot", "peer"], registry=r)
        gone = Gauge("edge:peer_lost", "", ["slot", "peer"], registry=r)
        for peer, n, s in (("10.0.0.2:50600", 3, sent), ("10.0.0.3:50600", 2, 0)):
            layers.labels("0", peer).set(n)
            up.labels("0", peer).inc(s)
            down.labels("0", peer).inc(s / 2)
            gone.labels("0", peer).set(1 if lost and n == 2 else 0)
        return metrics_text() + generate_latest(r).decode()

    pages = iter([page(1e6, False), page(3e6, True)])

    async def main():
        app = Monitor(lambda: next(pages), where="test", interval=60)
        async with app.run_test(size=(120, 50)) as pilot:
            await pilot.pause()
            assert app.query_one("#peers").has_class("shown")
            text = text_of(app, "#peers-text")
            assert "10.0.0.2:50600" in text and "ok" in text and "LOST" not in text
            app.prev.at -= 2.0  # the second scrape two seconds after the first
            app.poll()
            await pilot.pause()
            rows = {line.split()[0]: line.split() for line in text_of(app, "#peers-text").splitlines()[1:]}
            layers, up, down = rows["10.0.0.2:50600"][1:4]   # 2 MB up, 1 MB down in 2 s (and the scrape's own time)
            assert layers == "3" and 700 < float(up) <= 1000 and float(down) == pytest.approx(float(up) / 2, abs=0.1)
            assert rows["10.0.0.3:50600"][-1] == "LOST"
    asyncio.run(main())


def test_a_model_on_one_device_shows_no_group():
    async def main():
        app = Monitor(lambda: metrics_text(), where="test", interval=60)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause()
            assert not app.query_one("#peers").has_class("shown")
    asyncio.run(main())


def test_over_budget_is_flagged():
    async def main():
        app = Monitor(lambda: metrics_text(resident=700e6, budget=500e6), where="test", interval=60)
        async with app.run_test() as pilot:
            await pilot.pause()
            assert "OVER BUDGET" in text_of(app, "#memory-text")
            assert app.query_one("#memory").has_class("over")
    asyncio.run(main())


def test_budget_key_sends_the_new_budget():
    asked = []

    async def main():
        app = Monitor(lambda: metrics_text(), where="test", interval=60,
                      set_budget=lambda b: asked.append(b) or f"memory budget set to {b}")
        async with app.run_test() as pilot:
            await pilot.press("b")
            await pilot.press(*"600MB", "enter")
            await pilot.pause()
            assert "memory budget set to 600MB" in text_of(app, "#banner")
    asyncio.run(main())
    assert asked == ["600MB"]


def test_disconnect_is_shown_and_recovers():
    up = {"ok": False}

    def fetch():
        if not up["ok"]:
            raise ConnectionRefusedError("connection refused")
        return metrics_text()

    async def main():
        app = Monitor(fetch, where="http://127.0.0.1:9", interval=60)
        async with app.run_test() as pilot:
            await pilot.pause()
            assert "disconnected from http://127.0.0.1:9: connection refused" in text_of(app, "#banner")
            assert app.query_one("#banner").has_class("disconnected")
            up["ok"] = True
            await pilot.press("r")
            await pilot.pause()
            assert not app.query_one("#banner").has_class("disconnected")
            assert "1 running" in text_of(app, "#queue-text")
    asyncio.run(main())


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
def test_snapshot(snap_compare, size):
    app = Monitor(lambda: metrics_text(stack=7), where="http://127.0.0.1:8000", interval=60)
    assert snap_compare(app, terminal_size=size)


def test_monitor_against_a_real_server():
    from test_serve import KEY, Server

    from edge.monitor.source import ServerSource

    server = Server("--api-key", KEY)
    try:
        server.client().completions.create(model="x", prompt="def ", max_tokens=5)
        source = ServerSource(server.url, KEY)

        async def main():
            app = Monitor(source.metrics_text, where=server.url, interval=60, set_budget=source.set_budget)
            async with app.run_test() as pilot:
                await pilot.pause()
                assert "connected to" in text_of(app, "#banner")
                assert "(no budget)" in text_of(app, "#memory-text") and "MiB" in text_of(app, "#memory-text")
                assert "0 running, 0 waiting" in text_of(app, "#queue-text")
                await pilot.press("b", *"600MB", "enter")
                await pilot.pause()
                # the reference engine cannot resize: the server's refusal is shown
                assert "cannot change its memory budget" in text_of(app, "#banner")
        asyncio.run(main())
    finally:
        server.stop()
