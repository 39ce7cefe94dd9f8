"""``edge monitor``: a Textual app showing a running ``edge serve`` from its /metrics
(source.py reads and interprets them; app.py draws them; monitor.tcss styles it)."""
