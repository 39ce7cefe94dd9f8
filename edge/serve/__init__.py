"""``edge serve``: an OpenAI-compatible local server on FastAPI and uvicorn (app.py), its settings
(settings.py: one model for CLI flags, ``EDGE_*`` variables and the SDK), the request schemas
(protocol.py), the bounded admission and generation workers (worker.py) and the Prometheus
metrics (metrics.py)."""
